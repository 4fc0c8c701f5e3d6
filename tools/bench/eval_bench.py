"""`align bench eval`: questions/s of `align eval` answering one question at a time (as LLaVA's loader does, batch
1) and in left-padded batches, on an `align demo` workspace's held-out benchmark, at the demo's size or `small`."""

import shutil
import tempfile
from pathlib import Path

import torch

from align.adapters.adapter_files import load_adapter, save_adapter
from align.adapters.projector import build_projector
from align.backbones.registry import get_backbone
from align.errors import AlignError
from align.tools.results import RESULTS_DIR, device_name, write_result
from align.tools.bench.bench_sizes import derive_workspace, get_size, registered
from align.tools.evaluate.benchmarks import align_jsonl
from align.tools.evaluate.evaluate import evaluate_adapter
from align.tools.generation import GenerationOptions

DESCRIBE = "Describe this image."


def sized_adapter(workspace: Path, folder: Path) -> Path:
    """The demo's chat adapter for the workspace's LLM: itself at the demo's size, else a random projector of the
    same kind sized for the LLM (speed does not depend on the weights)."""
    demo_adapter = Path(workspace) / "runs" / "chat" / "adapter"
    config, _ = load_adapter(demo_adapter)
    spec = get_backbone(config.backbone)
    if spec.hidden_size == config.out_features:
        return demo_adapter
    torch.manual_seed(0)
    projector = build_projector(config.projector, config.in_features, spec.hidden_size)
    sized = config.model_copy(update={"out_features": spec.hidden_size, "hidden_size": spec.hidden_size,
                                      "vocab_size": spec.vocab_size})
    return save_adapter(folder / "adapter", sized, projector.state_dict())


def bench_eval(workspace: Path, *, size: str = "demo", questions: int = 48, batch_size: int = 16,
               max_new_tokens: int = 16, out_dir: Path = RESULTS_DIR, say=lambda line: None) -> tuple[dict, Path]:
    """Batch 1 against `batch_size` on the same questions; the JSON result and where it was written."""
    workspace = Path(workspace)
    questions_file = workspace / "data" / "held_out_eval.jsonl"
    if not questions_file.is_file():
        raise AlignError(f"{workspace} is not an `align demo` workspace of this version (no {questions_file.name}); "
                         f"run `align demo --out {workspace}`")
    target = derive_workspace(workspace, get_size(size), say)
    benchmark = align_jsonl(questions_file, None)
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    scratch = Path(tempfile.mkdtemp(prefix="align-bench-eval-"))
    rates = {}
    try:
        with registered(target):
            adapter = sized_adapter(workspace, scratch)
            common = dict(model=target / "llm", encoder=target / "encoder", prompt=DESCRIBE, options=options,
                          device=None, progress=False)
            evaluate_adapter(benchmark, adapter, scratch / "warm-up", limit=2, batch_size=2, **common)
            for batch in (1, batch_size):
                say(f"answering {questions} questions {batch} at a time")
                row = evaluate_adapter(benchmark, adapter, scratch / f"batch-{batch}", limit=questions,
                                       batch_size=batch, **common)
                rates[batch] = row.questions_per_second
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "bench": "eval", "size": size, "device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "workspace": str(workspace), "questions": questions, "max_new_tokens": max_new_tokens,
        "command": f"align bench eval --workspace {workspace} --size {size} --batch-size {batch_size}",
        "batch_1_questions_per_second": rates[1], "batched_questions_per_second": rates[batch_size],
        "batch_size": batch_size, "speedup": round(rates[batch_size] / rates[1], 2) if rates[1] else None,
        "torch_threads": torch.get_num_threads(),
    }
    return write_result(result, out_dir, f"eval-{size}")
