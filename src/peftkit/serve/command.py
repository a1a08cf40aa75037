"""``peftkit serve`` and ``peftkit export``: arguments and entry points (FastAPI and uvicorn
are imported only when a server starts)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="a model folder, a hub id, 'minilm', or a peftkit train run folder")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="an adapter to serve under NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept requests with 'Authorization: Bearer KEY' only (repeatable: one key per caller)")
    p.add_argument("--max-adapters", type=int, default=8, help="adapters held in memory at once (default 8)")
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--max-model-len", type=int, help="prompt + generated tokens (default: the model's positions)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting to start before 429 (default 256)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    jobs = p.add_argument_group("fine-tuning jobs (OpenAI's /v1/files and /v1/fine_tuning/jobs; needs the jobs extra)")
    jobs.add_argument("--jobs", action="store_true", help="serve the fine-tuning jobs API; fine-tuned models are served at once")
    jobs.add_argument("--state", default="peftkit-state", help="files, job folders and the SQLite database (default ./peftkit-state)")
    jobs.add_argument("--db", help="the jobs database URL (default: SQLite in --state; postgresql://USER@HOST/DB to share it)")
    jobs.add_argument("--workers", type=int, default=1,
                      help="worker processes this server starts (default 1; 0 when `peftkit worker`s run elsewhere)")


def parse_adapters(specs: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"peftkit serve: error: --adapter {spec!r} must be NAME=PATH")
        if name in adapters:
            raise SystemExit(f"peftkit serve: error: --adapter {name!r} is given twice")
        adapters[name] = path
    return adapters


def build_server(args: argparse.Namespace):
    """The Server for the parsed arguments (the model loaded, the engine not yet started)."""
    from peftkit.serve.app import Server
    from peftkit.serve.encoder import EncoderEngine
    from peftkit.serve.engine import GenerationEngine
    from peftkit.serve.loading import load_base

    served = load_base(args.base, args.dtype)
    for name, path in parse_adapters(args.adapter).items():
        if name in served.adapters or name == served.model_id:
            raise SystemExit(f"peftkit serve: error: the adapter name {name!r} is taken (the base or the run's adapter)")
        served.adapters[name] = path
    options = dict(adapters={}, max_adapters=args.max_adapters, max_batch_size=args.max_batch_size,
                   max_model_len=args.max_model_len)
    if served.kind == "generate":
        engine = GenerationEngine(served.model, served.tokenizer, max_queue=args.max_queue, **options)
    else:
        engine = EncoderEngine(served.model, served.tokenizer, labels=served.labels, **options)
    server = Server(served, engine, api_keys=args.api_key)
    # Adapters are checked against the base now: one that does not fit stops the start with the
    # key and both shapes, rather than failing the first request that names it.
    for name, path in served.adapters.items():
        server.engine.pool.add(name, path)
    return server


def _jobs_extension(server, args: argparse.Namespace):
    """The jobs service on this server's base: its routes, and every fine-tuned model served
    (under ``ft:<base>:<suffix>:<job id>``) as soon as its job succeeds."""
    try:
        from peftkit.jobs.service import JobService
        from peftkit.serve.jobs_routes import jobs_router
    except ImportError as exc:
        raise ImportError(f"{exc.name} is missing; install the jobs extra: pip install 'peftkit[jobs]'") from exc
    served = server.served
    if served.kind != "generate":
        raise ValueError(f"fine-tuning jobs train causal language models; {served.model_id!r} is not one")

    def ready(model_id: str, adapter_dir: str, _base_id: str) -> None:
        if model_id not in server.engine.pool.known:
            server.add_adapter(model_id, adapter_dir)

    service = JobService({served.model_id: served.path}, state_dir=args.state, db_url=args.db,
                         on_model_ready=ready, workers=args.workers)
    server.on_start.append(service.start)
    server.on_stop.append(service.close)

    def extend(app, _server) -> None:
        app.include_router(jobs_router(service, app.state.owner_dependency))
    return extend


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn

        from peftkit.serve.app import create_app
        from peftkit.serve.errors import APIError
    except ImportError as exc:
        print(f"peftkit serve: error: {exc.name} is missing; install the serve extra: pip install 'peftkit[serve]'",
              file=sys.stderr)
        return 2
    try:
        server = build_server(args)
    except (ValueError, APIError) as exc:
        print(f"peftkit serve: error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    extensions = []
    if args.jobs:
        try:
            extensions.append(_jobs_extension(server, args))
        except (ImportError, ValueError) as exc:
            print(f"peftkit serve: error: --jobs: {exc}", file=sys.stderr)
            return 2
    app = create_app(server, extensions)
    print(f"peftkit serve: {server.served.model_id} ({server.served.kind}) with adapters "
          f"{sorted(server.engine.pool.known) or 'none'} on http://{args.host}:{args.port}/v1", flush=True)
    # uvicorn finishes the open requests on SIGTERM/SIGINT, then re-raises the signal to the
    # handler that was there before it: this one, so that a graceful stop exits with status 0.
    stopped: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, _frame: stopped.append(number))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                timeout_graceful_shutdown=60)
    if stopped:
        print(f"peftkit serve: stopped by {signal.Signals(stopped[0]).name} after finishing the running requests",
              flush=True)
    return 0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a peftkit train run folder or an adapter folder")
    p.add_argument("--for", dest="target", required=True, choices=["vllm"], help="the server to export for")
    p.add_argument("--out", help="the folder to write (default: RUN-vllm beside the run)")
    p.add_argument("--name", help="the adapter's name in the printed command (default: the run's folder name)")


def cmd_export(args: argparse.Namespace) -> int:
    import os

    from peftkit.serve.vllm_export import export_for_vllm

    out = args.out or os.path.normpath(args.run) + "-vllm"
    try:
        export = export_for_vllm(args.run, out, args.name)
    except (ValueError, OSError) as exc:
        print(f"peftkit export: error: {exc}", file=sys.stderr)
        return 2
    folded = f" ({export.folded_modules} modules' rank/alpha patterns folded into lora_B)" if export.folded_modules else ""
    print(f"wrote {export.folder}{folded}")
    print(export.command())
    return 0
