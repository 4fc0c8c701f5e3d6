"""The web UI (gradio, messages format): upload an image, then chat about it with streamed replies, MiniGPT-4's
upload-then-chat; a new image starts a new conversation. Replies come from the same engine queue as the API's.

Everything the page needs is served by this process: no share link, no analytics, system fonts only.
"""

import os
from dataclasses import replace
from pathlib import Path

from PIL import Image

from align.errors import AlignError
from align.tools.generation import GenerationOptions
from align.tools.images import BadImage, decode_image, image_bytes
from align.tools.serving.engine import Done, Engine, Request

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: it phones home otherwise

import gradio as gr  # noqa: E402

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]
ERROR_PREFIX = "⚠️ "


def theme() -> gr.themes.Base:
    """gradio's default look with the system's fonts: the default theme fetches its fonts from Google."""
    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)


def build_ui(engine: Engine, *, adapter: Path, examples: list[Path]) -> gr.Blocks:
    """The page: image, settings and the chat, over `engine`."""
    pipeline = engine.pipeline
    defaults = GenerationOptions()
    with gr.Blocks(title=f"align · {pipeline.spec.name}", analytics_enabled=False) as page:
        gr.Markdown(f"### align · backbone **{pipeline.spec.name}** · adapter `{adapter}` · template "
                    f"**{pipeline.template.name}**", elem_id="about")
        # Per browser tab: the exchanges so far and the image's features once encoded (a tensor, small).
        state = gr.State({"turns": [], "features": None})
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Image (a new one starts a new conversation)",
                                 sources=["upload", "clipboard"], elem_id="image", height=280)
                if examples:
                    gr.Examples([[str(path)] for path in examples], inputs=[image], label="Examples")
                system = gr.Textbox(pipeline.system or "", label="System prompt", lines=2, elem_id="system",
                                    visible=pipeline.template.supports_system)
                with gr.Accordion("Generation", open=False, elem_id="generation"):
                    temperature = gr.Slider(0, 2, value=defaults.temperature, step=0.05, label="Temperature (0: greedy)",
                                            elem_id="temperature")
                    top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top-p", elem_id="top-p")
                    max_new = gr.Slider(1, 1024, value=defaults.max_new_tokens, step=1, label="Max new tokens",
                                        elem_id="max-new-tokens")
                    beams = gr.Slider(1, 8, value=defaults.num_beams, step=1, label="Beams (no streaming above 1)",
                                      elem_id="beams")
                    penalty = gr.Slider(1, 2, value=defaults.repetition_penalty, step=0.05, label="Repetition penalty",
                                        elem_id="repetition-penalty")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", elem_id="chat", height=480, buttons=["copy"],
                                     feedback_options=None)
                question = gr.Textbox(placeholder="Ask about the image and press Enter", show_label=False,
                                      elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
                status = gr.Markdown("", elem_id="status")
        settings = [temperature, top_p, max_new, beams, penalty, system]

        def ask(text: str, picture: str | None, conversation: dict, *chosen):
            """Stream the reply to `text`; the question box empties, errors land in the status line."""
            text = (text or "").strip()
            if not text:
                yield gr.skip(), gr.skip(), conversation, f"{ERROR_PREFIX}type a question first"
                return
            yield from reply(text, picture, conversation, chosen, clear_box=True)

        def again(picture: str | None, conversation: dict, *chosen):
            """Ask the last question again, forgetting its reply."""
            if not conversation["turns"]:
                yield gr.skip(), gr.skip(), conversation, f"{ERROR_PREFIX}nothing to regenerate yet"
                return
            question_text = conversation["turns"][-1][0]
            kept = {**conversation, "turns": conversation["turns"][:-1]}
            yield from reply(question_text, picture, kept, chosen, clear_box=False)

        def reply(text: str, picture: str | None, conversation: dict, chosen: tuple, clear_box: bool):
            box = "" if clear_box else gr.skip()
            turns = conversation["turns"]
            shown = messages(turns) + [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
            try:
                options = options_from(chosen)
                prompt = pipeline.prompt([*turns, (text, None)], picture is not None, options.max_new_tokens,
                                         system=system_text(chosen[-1]))
                features = conversation["features"] if picture is not None else None
                pixels = uploaded(picture) if picture is not None and features is None else None
                job = engine.submit(Request(prompt, options, image=pixels, features=features))
            except (AlignError, ValueError) as exc:
                yield gr.skip(), gr.skip(), conversation, ERROR_PREFIX + str(exc)
                return
            yield box, shown, conversation, ""
            written = ""
            try:
                for event in job.events():
                    if isinstance(event, Done):
                        kept = {"turns": [*turns, (text, event.reply.text)], "features": event.features}
                        shown[-1] = {"role": "assistant", "content": event.reply.text}
                        yield box, shown, kept, ""
                        return
                    written += event
                    shown[-1] = {"role": "assistant", "content": written}
                    yield box, shown, conversation, ""
            except AlignError as exc:  # the question goes back in its box, to try again
                yield text if clear_box else gr.skip(), messages(turns), conversation, ERROR_PREFIX + str(exc)
            finally:
                job.cancel()  # the tab was closed or the event cancelled: free the model

        def system_text(text: str) -> str | None:
            return text if pipeline.template.supports_system else None

        def new_image(picture: str | None):
            """A new image (or none): a new conversation."""
            return [], {"turns": [], "features": None}, ""

        def forget(conversation: dict):
            """Forget the exchanges, keep the image."""
            return [], {**conversation, "turns": []}, ""

        outputs = [question, chatbot, state, status]
        for trigger in (question.submit, send.click):
            trigger(ask, [question, image, state, *settings], outputs, show_progress_on=[chatbot])
        regenerate.click(again, [image, state, *settings], outputs, show_progress_on=[chatbot])
        clear.click(forget, [state], [chatbot, state, status])
        chatbot.clear(forget, [state], [chatbot, state, status])  # the chat's own bin icon
        image.change(new_image, [image], [chatbot, state, status])
    return page


def uploaded(path: str) -> Image.Image:
    """The picture a user uploaded, or one line on why it cannot be read (without gradio's temporary path)."""
    try:
        return decode_image(image_bytes(Path(path)), convert_modes=True)
    except BadImage as exc:
        raise AlignError(f"cannot read this image: {exc}") from None


def options_from(chosen: tuple) -> GenerationOptions:
    """The sliders' generation options (the system prompt, last, is not one)."""
    temperature, top_p, max_new, beams, penalty = chosen[:5]
    return replace(GenerationOptions(), temperature=float(temperature), top_p=float(top_p),
                   max_new_tokens=int(max_new), num_beams=int(beams), repetition_penalty=float(penalty))


def messages(turns: list) -> list[dict]:
    """The conversation in gradio's messages format."""
    return [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]

