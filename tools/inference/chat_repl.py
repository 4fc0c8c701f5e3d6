"""`align chat`: open a chat session from the command line's choices, and the interactive loop around it."""

import atexit
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from align.backbones.registry import align_home
from align.errors import AlignError
from align.tools.inference.chat_session import ChatSession, open_chat
from align.tools.generation import GenerationOptions
from align.tools.pipeline import Pipeline

HELP = """commands:
  :image PATH   talk about another image (starts a new conversation)
  :clear        forget the conversation, keep the image
  :history      show the conversation so far
  :help         this list
  :quit         leave (Ctrl-D too)
anything else is your next message."""


def open_session(
    adapter: Path, *, image: Path | None = None, model: Path | None = None, encoder: Path | None = None,
    features: Path | None = None, key: str | None = None, device: str | None = None,
    dtype: str | None = None, quantization: str = "none", trust_remote_code: bool = False,
) -> ChatSession:
    """Load the pipeline and start a conversation about `image`, or about stored features (`features` + `key`)."""
    if features is not None and image is not None:
        raise AlignError("give --image or --features/--key, not both")
    if (features is None) != (key is None):
        raise AlignError("--features STORE and --key K go together")
    if image is not None and encoder is None:
        raise AlignError("--image needs --encoder PATH (the BLIP-2 encoder the adapter was trained on), "
                         "or use cached features with --features STORE --key K")
    if image is not None and not Path(image).is_file():
        raise AlignError(f"image {image} does not exist")
    pipeline = Pipeline.load(adapter, model=model, encoder=encoder, store=features, device=device, dtype=dtype,
                             quantization=quantization, trust_remote_code=trust_remote_code)
    stored = pipeline.stored_features(features, key) if features is not None else None
    return open_chat(pipeline, image=image, features=stored)


def line_editing(history: Path) -> None:
    """Arrow keys, editing and history (kept in `history`) for `input()`, through the readline module."""
    try:
        import readline
    except ImportError:  # a Python built without readline: plain input still works
        return
    try:
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
        except OSError:
            pass

    atexit.register(save)


def run_repl(session: ChatSession, options: GenerationOptions, read: Callable[[str], str] = input,
             out: TextIO = sys.stdout) -> None:
    """Read messages and commands until :quit or end of input; replies stream as they are generated."""
    stream = options.num_beams == 1

    def show(text: str) -> None:
        out.write(text)
        out.flush()

    if read is input and sys.stdin.isatty():
        line_editing(align_home() / "chat_history")
    what = "an image" if session.features is not None else "no image (use :image PATH)"
    show(f"Chatting about {what} with {session.pipeline.spec.name}. Type :help for commands.\n")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            show("\n")
            return
        if not line:
            continue
        command, _, argument = line.partition(" ")
        try:
            if command == ":quit":
                return
            elif command == ":help":
                show(HELP + "\n")
            elif command == ":clear":
                session.clear()
                show("(conversation cleared; same image)\n")
            elif command == ":history":
                for question, reply in session.turns:
                    show(f"you> {question}\nbot> {reply}\n")
            elif command == ":image":
                if not argument.strip():
                    raise AlignError("usage: :image PATH")
                session.set_image(Path(argument.strip()).expanduser())
                show(f"(new conversation about {argument.strip()})\n")
            elif command.startswith(":"):
                show(f"unknown command {command}; type :help\n")
            else:
                show("bot> ")
                reply = session.ask(line, options, on_text=show if stream else None)
                show(("" if stream else reply) + "\n")
        except AlignError as exc:
            show(f"error: {exc}\n")
        except KeyboardInterrupt:
            show("\n(interrupted; that question was not kept)\n")
