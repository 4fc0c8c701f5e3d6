"""The `align` command: parse arguments, call one function, print. Errors become one line and exit code 2."""

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from align import __version__
from align.errors import AlignError

app = typer.Typer(
    help="Give a causal LLM eyes: train one projector on cached BLIP-2 Q-Former features.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
backbones_app = typer.Typer(help="List and inspect the LLMs align can plug in.", no_args_is_help=True)
app.add_typer(backbones_app, name="backbones")

# Piped output gets a wide fixed width so tables are not squeezed to 80 columns.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]


def _print_json(data) -> None:
    print(json.dumps(data, ensure_ascii=False, indent=2))


def _version(value: bool) -> None:
    if value:
        print(f"align {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True)] = None,
) -> None:
    """Give a causal LLM eyes: train one projector on cached BLIP-2 Q-Former features."""


@backbones_app.command("list")
def backbones_list(as_json: JsonFlag = False) -> None:
    """List presets and added backbones."""
    from align.backbones.registry import list_backbones

    rows = list_backbones()
    if as_json:
        _print_json([{**r.spec.model_dump(mode="json"), "is_preset": r.is_preset, "is_added": r.is_added} for r in rows])
        return
    table = Table("name", "template", "tokenizer", "hidden", "vocab", "24 GB GPU", "languages", "model")
    for r in rows:
        where = r.spec.model_path if r.is_added else f"{r.spec.model or 'local path required'} (not added)"
        fit = r.spec.dtype if r.spec.quantization == "none" else f"{r.spec.quantization}"
        table.add_row(
            r.spec.name, r.spec.template, r.spec.tokenizer, str(r.spec.hidden_size), str(r.spec.vocab_size), fit,
            ",".join(r.spec.languages) or "-", where,
        )
    out.print(table)


@backbones_app.command("show")
def backbones_show(name: str, as_json: JsonFlag = False) -> None:
    """Show one backbone's full record and its template's stop rules."""
    from align.backbones.registry import get_backbone
    from align.templates import get_template

    spec = get_backbone(name)
    template = get_template(spec.template)
    data = {
        **spec.model_dump(mode="json"),
        "stop_controls": list(template.stop_controls),
        "stop_strings": list(template.stop_strings),
    }
    if as_json:
        _print_json(data)
        return
    for key, value in data.items():
        out.print(f"[bold]{key}[/bold]: {escape(str(value))}", highlight=False)


@app.command("add-backbone")
def add_backbone(
    name: Annotated[str, typer.Argument(help="A preset name, or a new lower-case name for your LLM.")],
    model: Annotated[Optional[Path], typer.Option(help="Local model directory (config.json + tokenizer files).")] = None,
    template: Annotated[Optional[str], typer.Option(help="Chat template (detected from chat_template if omitted).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer kind: hf, sentencepiece or qwen-tiktoken.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an entry that is already added.")] = False,
) -> None:
    """Plug an LLM in: check its tokenizer and template, then add it to the registry."""
    from align.backbones.registry import add_backbone as add

    result = add(name, model, template, tokenizer, force)
    for check in result.checks:
        mark = "[green]ok[/green]  " if check.ok else "[red]FAIL[/red]"
        out.print(f"{mark} {check.name}: {escape(check.detail)}", highlight=False)
    if not result.ok:
        failed = [c.name for c in result.checks if not c.ok]
        raise AlignError(f"'{name}' not added; failed: {', '.join(failed)}")
    out.print(f"added '{result.spec.name}' (template {result.spec.template}) → {escape(str(result.path))}", highlight=False)


@app.command("render")
def render(
    name: Annotated[str, typer.Argument(help="Backbone name.")],
    conversation: Annotated[Path, typer.Option(help="A JSON file holding one conversation record.")],
    model: Annotated[Optional[Path], typer.Option(help="Model directory (default: the added backbone's).")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Truncate to this many tokens (whole turns).")] = None,
    tokens: Annotated[bool, typer.Option("--tokens", help="One row per token instead of the text view.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Show what the model sees: ids, learnt tokens and image slots for one conversation."""
    from align.tools.render_view import readable, render_file, token_table

    spec, tokenizer, rendered = render_file(name, conversation, model, max_length)
    if as_json:
        _print_json(rendered.as_json())
    elif tokens:
        out.print(token_table(tokenizer, rendered))
    else:
        out.print(readable(spec, tokenizer, rendered))


@app.command("templates")
def templates() -> None:
    """List the chat templates."""
    from align.templates import get_template, template_names

    for name in template_names():
        out.print(f"[bold]{name}[/bold]  {escape(get_template(name).description)}", highlight=False)


def main() -> None:
    """Entry point of the `align` console script."""
    try:
        app(prog_name="align")
    except AlignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
