"""`align serve`: load one pipeline, put the web UI and the API in front of it, and run until Ctrl-C."""

import socket
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI

from align.errors import AlignError
from align.tools.images import IMAGE_SUFFIXES
from align.tools.pipeline import Pipeline
from align.tools.serving.api import BodyLimit, add_api
from align.tools.serving.chat_request import Limits
from align.tools.serving.engine import Engine


def build_app(engine: Engine, *, adapter: Path, ui: bool = True, api: bool = True, served_name: str | None = None,
              limits: Limits = Limits(), image_root: Path | None = None, api_key: str | None = None,
              examples: list[Path] = ()) -> FastAPI:
    """One ASGI app: the API under /v1 and the web UI at /, both over `engine`."""
    if not (ui or api):
        raise AlignError("--no-ui and --no-api together leave nothing to serve")
    app = FastAPI(title="align", docs_url=None, redoc_url=None, openapi_url=None)
    if api:
        add_api(app, engine, served_name=served_name or engine.pipeline.spec.name, limits=limits,
                image_root=image_root, api_key=api_key)
    if ui:
        import gradio as gr

        from align.tools.serving.web_ui import build_ui, theme

        page = build_ui(engine, adapter=adapter, examples=list(examples))
        app = gr.mount_gradio_app(app, page, path="/", theme=theme(), ssr_mode=False, footer_links=[],
                                  max_file_size=limits.max_image_bytes, mcp_server=False,
                                  allowed_paths=sorted({str(p.parent) for p in examples}))
    return BodyLimit(app, limits.max_body_bytes)


def example_images(paths: list[Path]) -> list[Path]:
    """The images given with --examples: files as they are, folders for the images in them."""
    found = []
    for path in paths:
        path = path.expanduser().resolve()
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise AlignError(f"example {path} does not exist")
    return found


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0: any free port), taken before the model loads so a busy port fails fast."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AlignError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def serve(adapter: Path, *, model: Path | None = None, encoder: Path | None = None, device: str | None = None,
          dtype: str | None = None, quantization: str = "none", trust_remote_code: bool = False,
          host: str = "127.0.0.1", port: int = 7860, ui: bool = True, api: bool = True, api_key: str | None = None,
          image_root: Path | None = None, examples: list[Path] = (), served_name: str | None = None,
          limits: Limits = Limits(), max_batch: int = 8, say: Callable[[str], None] = print) -> None:
    """Serve until interrupted; `say` gets the addresses once the server listens."""
    import uvicorn

    if not (ui or api):
        raise AlignError("--no-ui and --no-api together leave nothing to serve")
    if encoder is None:
        raise AlignError("align serve needs --encoder PATH: the BLIP-2 encoder the adapter was trained on reads the images")
    if image_root is not None and not image_root.is_dir():
        raise AlignError(f"--image-root {image_root} is not a folder")
    shown = example_images(list(examples))
    sock = bind(host, port)
    engine = None
    try:
        pipeline = Pipeline.load(adapter, model=model, encoder=encoder, device=device, dtype=dtype,
                                 quantization=quantization, trust_remote_code=trust_remote_code)
        engine = Engine(pipeline, limits.max_queue, max_batch)
        app = build_app(engine, adapter=adapter, ui=ui, api=api, served_name=served_name, limits=limits,
                        image_root=image_root, api_key=api_key, examples=shown)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        where = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
        name = served_name or pipeline.spec.name
        lines = ([f"web UI: {where}/"] if ui else []) + ([f"API:    {where}/v1 (OpenAI-compatible, model '{name}')"] if api else [])
        say("\n".join(lines + ["Ctrl-C stops the server."]))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then raises it again for whoever called it
            pass
        say("server stopped")
    finally:
        sock.close()
        if engine is not None:
            engine.close()
