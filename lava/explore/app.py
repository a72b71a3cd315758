"""The Gradio layout of ``lava explore``: widgets wired to ``Explorer`` (``session.py``).

Every model call goes through one queue slot (``concurrency_id="model"``, limit 1), so tabs and
API clients wait their turn and none fails; the ``Explorer`` lock guards the model as well.
Handlers never raise into Gradio: bad input becomes lava's one-line message in the status box
(the API endpoint raises ``gr.Error`` with it), so no traceback reaches a page and the server
keeps serving.

Files: Gradio stores uploads, and serves files, only inside the app's temporary folder (its
``GRADIO_TEMP_DIR``, set by ``serve`` before Gradio is imported); the shipped examples are copied
there, results are written there, and ``Explorer.load`` refuses any image path outside it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from types import SimpleNamespace

from ..errors import LavaError, describe_os_error
from ..options import DIRECTIONS, IMAGE_TO_TEXT, JOINT, SOFTMAX_DOMAINS, TOKEN_PARTS
from .handlers import api_handler, example_handler, grid_handler, segment_handler, sigma_handlers
from .session import BACKGROUNDS, Explorer

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"
INSTALL_HINT = 'pip install -e ".[explore]" in a clone of lava, or pip install "lava-seg[explore]"'
DEFAULT_MAX_UPLOAD = 10 * 1024 * 1024  # bytes


def require_gradio():
    """The ``gradio`` module, or a ``LavaError`` that says how to install it."""
    try:
        import gradio
    except ImportError:
        raise LavaError(f"lava explore needs Gradio, an optional extra: {INSTALL_HINT}") from None
    return gradio


def copy_examples(folder: Path) -> dict[str, tuple[Path, str]]:
    """The shipped example scenes copied into ``folder``: ``{name: (image path, classes text)}``.

    Copies, not the package's own files: Gradio serves only the app's folder."""
    scenes = json.loads((EXAMPLES_DIR / "examples.json").read_text())["scenes"]
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for scene in scenes:
        target = folder / scene["image"]
        shutil.copyfile(EXAMPLES_DIR / scene["image"], target)
        out[Path(scene["image"]).stem] = (target, ", ".join(scene["classes"]))
    return out


def build_app(explorer: Explorer, examples: dict[str, tuple[Path, str]], results_dir: Path):
    """The ``gr.Blocks`` app over ``explorer``; ``results_dir`` (inside the app folder) receives
    each request's download files."""
    gr = require_gradio()
    backend = explorer.backend
    results_dir.mkdir(parents=True, exist_ok=True)
    with gr.Blocks(title=f"lava explore — {backend.name}", delete_cache=(3600, 3600)) as app:
        cache = gr.State(None)
        gr.Markdown(
            f"## lava explore · `{backend.name}`\n{backend.describe()}. Pick an image and name the "
            "classes; the map depends strongly on the timestep and the block it is read from."
        )
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                inputs = input_panel(gr, backend, examples)
                options = options_panel(gr, backend)
            with gr.Column(scale=2):
                with gr.Tab("segmentation"):
                    results = segmentation_tab(gr)
                with gr.Tab("timestep × block grid"):
                    grid = grid_tab(gr, backend)
        page = SimpleNamespace(**vars(inputs), **vars(options), **vars(results), **vars(grid), cache=cache)
        wire(gr, page, explorer, examples, results_dir)
    return app


def input_panel(gr, backend, examples: dict[str, tuple[Path, str]]) -> SimpleNamespace:
    """The image, the class names, the timestep (and its σ), the blocks, the Segment button and
    the status line."""
    d = backend.defaults
    n_time = backend.num_train_timesteps
    block_names = [str(i) for i in backend.joint_blocks]
    image = gr.Image(
        label="image",
        type="filepath",
        image_mode=None,  # keep the file as sent: lava's own loader converts it
        sources=["upload", "clipboard"],
        format="png",
        height=260,
        elem_id="image",
    )
    example = gr.Dropdown(
        choices=list(examples),
        value=None,
        label="or a shipped example",
        elem_id="example",
    )
    classes = gr.Textbox(
        label="classes (comma-separated; Enter runs)",
        placeholder="red square, blue triangle, yellow circle",
        elem_id="classes",
    )
    with gr.Row():
        timestep = gr.Slider(
            0, n_time - 1, value=d.timestep, step=1, label="timestep", elem_id="timestep", scale=3
        )
        sigma = gr.Number(
            value=round(backend.sigma_for_timestep(d.timestep), 4),
            label="σ (Enter runs)",
            step=0.001,  # no bounds here: lava checks σ and says what is wrong
            elem_id="sigma",
            scale=1,
        )
    blocks = gr.CheckboxGroup(
        block_names,
        value=[str(i) for i in d.layers],
        label="blocks (the mean of the selected)",
        elem_id="blocks",
    )
    run = gr.Button("Segment", variant="primary", elem_id="run")
    status = gr.Markdown(
        "Upload an image or pick an example, name the classes, press Segment.", elem_id="status"
    )
    return SimpleNamespace(
        image=image,
        example=example,
        classes=classes,
        timestep=timestep,
        sigma=sigma,
        blocks=blocks,
        run=run,
        status=status,
    )


def options_panel(gr, backend) -> SimpleNamespace:
    """How the attention is read (source, view, tokens, normalisation, refinement, seed) and the
    background settings; every value starts at the model's default."""
    d = backend.defaults
    with gr.Accordion("how the attention is read", open=False):
        source = gr.Radio(["attention", "concept"], value="attention", label="source")
        direction = gr.Radio(list(DIRECTIONS), value=IMAGE_TO_TEXT, label="direction")
        softmax = gr.Radio(list(SOFTMAX_DOMAINS), value=JOINT, label="softmax domain")
        tokens = gr.Radio(list(TOKEN_PARTS), value="all", label="class tokens")
        normalize = gr.Dropdown(
            ["default", "minmax", "global", "classes", "none"],
            value="default",
            label=f"normalisation (default: {d.normalize})",
        )
        refine = gr.Radio(
            ["default", "none", "pamr"],
            value="default",
            label=f"refine (default: {d.refine or 'none'})",
        )
        seed = gr.Number(value=0, precision=0, label="noise seed")
    with gr.Accordion("background", open=True):
        background = gr.Radio(
            list(BACKGROUNDS),
            value="threshold" if d.background_threshold is not None else "none",
            label="background",
            info="threshold: weak pixels are background · none: every pixel gets a class · "
            "class: name 'background' in the prompt",
        )
        threshold = gr.Slider(
            0, 1, value=d.background_threshold or 0.0, step=0.01, label="background threshold"
        )
        presence = gr.Slider(
            0,
            1,
            value=d.min_presence or 0.0,
            step=0.01,
            label="min presence (0: every class competes)",
        )
    return SimpleNamespace(
        source=source,
        direction=direction,
        softmax=softmax,
        tokens=tokens,
        normalize=normalize,
        refine=refine,
        seed=seed,
        background=background,
        threshold=threshold,
        presence=presence,
    )


def segmentation_tab(gr) -> SimpleNamespace:
    """The overlay, the label map, one heatmap per class and the download files."""
    with gr.Row():
        overlay = gr.Image(label="overlay", format="png", interactive=False, elem_id="overlay")
        labels = gr.Image(label="label map", format="png", interactive=False, elem_id="labels")
    heatmaps = gr.Gallery(
        label="one heatmap per class",
        columns=4,
        format="png",
        height="auto",
        elem_id="heatmaps",
    )
    downloads = gr.File(label="downloads", file_count="multiple", interactive=False, elem_id="downloads")
    return SimpleNamespace(overlay=overlay, labels=labels, heatmaps=heatmaps, downloads=downloads)


def grid_tab(gr, backend) -> SimpleNamespace:
    """One class's map at each timestep × block, computed on request."""
    n_time = backend.num_train_timesteps
    block_names = [str(i) for i in backend.joint_blocks]
    with gr.Row():
        grid_class = gr.Dropdown([], label="class", allow_custom_value=True, elem_id="grid_class")
        grid_times = gr.Textbox(
            value=",".join(str(t) for t in _spread(n_time)),
            label="timesteps",
            elem_id="grid_times",
        )
    grid_blocks = gr.CheckboxGroup(block_names, value=block_names, label="blocks", elem_id="grid_blocks")
    grid_run = gr.Button("Compute grid (one forward per timestep)", elem_id="grid_run")
    grid_status = gr.Markdown("", elem_id="grid_status")
    grid = gr.Image(label="class map: timestep × block", format="png", interactive=False, elem_id="grid")
    return SimpleNamespace(
        grid_class=grid_class,
        grid_times=grid_times,
        grid_blocks=grid_blocks,
        grid_run=grid_run,
        grid_status=grid_status,
        grid=grid,
    )


def wire(gr, page: SimpleNamespace, explorer: Explorer, examples, results_dir: Path) -> None:
    """Connect the widgets of ``page`` to the handlers (``handlers.py``) and add the hidden
    ``/segment`` API endpoint. Every model call shares one queue slot."""
    reading = [
        page.image,
        page.classes,
        page.timestep,
        page.blocks,
        page.source,
        page.direction,
        page.softmax,
        page.tokens,
        page.seed,
        page.normalize,
        page.background,
        page.threshold,
        page.presence,
        page.refine,
    ]
    segment_ui = segment_handler(gr, explorer, results_dir)
    sigma_to_t, t_to_sigma, segment_at_sigma = sigma_handlers(gr, explorer, segment_ui)
    grid_ui = grid_handler(gr, explorer)
    load_example = example_handler(gr, examples)
    outputs = [
        page.status,
        page.overlay,
        page.labels,
        page.heatmaps,
        page.downloads,
        page.grid_class,
        page.cache,
    ]
    model = dict(concurrency_id="model", concurrency_limit=1, trigger_mode="always_last")
    page.run.click(segment_ui, [*reading, page.cache], outputs, api_name="explore", **model)
    for trigger in (
        page.classes.submit,
        page.timestep.release,
        page.threshold.release,
        page.presence.release,
        page.blocks.input,
        page.source.input,
        page.direction.input,
        page.softmax.input,
        page.tokens.input,
        page.normalize.input,
        page.background.input,
        page.refine.input,
    ):
        trigger(segment_ui, [*reading, page.cache], outputs, api_visibility="private", **model)
    page.example.select(
        load_example, page.example, [page.image, page.classes], api_visibility="private", queue=False
    ).then(segment_ui, [*reading, page.cache], outputs, api_visibility="private", **model)
    page.sigma.submit(
        segment_at_sigma,
        [page.sigma, *reading, page.cache],
        [*outputs, page.timestep],
        api_visibility="private",
        **model,
    )
    page.timestep.input(t_to_sigma, page.timestep, page.sigma, api_visibility="private", queue=False)
    page.sigma.input(sigma_to_t, page.sigma, page.timestep, api_visibility="private", queue=False)
    page.grid_run.click(
        grid_ui,
        [*reading, page.grid_class, page.grid_times, page.grid_blocks, page.cache],
        [page.grid_status, page.grid, page.cache],
        api_name="grid",
        **model,
    )
    api_endpoint(gr, explorer, results_dir)


def api_endpoint(gr, explorer: Explorer, results_dir: Path) -> None:
    """``/segment``: hidden widgets, the model's defaults (what ``lava segment`` does with no options)."""
    with gr.Row(visible=False):
        api_image = gr.Image(type="filepath", image_mode=None, format="png")
        api_classes = gr.Textbox()
        api_overlay = gr.Image(format="png")
        api_labels = gr.Image(format="png")
        api_button = gr.Button()
    api_button.click(
        api_handler(gr, explorer, results_dir),
        [api_image, api_classes],
        [api_overlay, api_labels],
        api_name="segment",
        concurrency_id="model",
        concurrency_limit=1,
    )


def _spread(n_time: int, count: int = 5) -> list[int]:
    """``count`` timesteps spread over the schedule (100, 300, 500, 700, 900 for 1000 steps)."""
    return [round(n_time * (2 * i + 1) / (2 * count)) for i in range(count)]


def check_port(host: str, port: int) -> None:
    """Refuse at once (before the model loads) an address the server could not listen on."""

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself binds
        try:
            probe.bind((host, port))
        except OSError as err:
            raise LavaError(
                f"cannot listen on {host}:{port}: {describe_os_error(err)}; pick another --port (or --host)"
            ) from None


def serve(
    explorer_factory,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_upload: int = DEFAULT_MAX_UPLOAD,
    block: bool = True,
    ready=None,
):
    """Make the app folder, point Gradio at it, build the explorer (``explorer_factory(folder)``:
    the model loads once, here) and serve until interrupted; uploads over ``max_upload`` bytes are
    refused. ``ready(message)`` is called once the server answers. Returns the running app and its
    folder at once when ``block`` is false."""
    require_gradio()
    check_port(host, port)
    folder = Path(tempfile.mkdtemp(prefix="lava-explore-")).resolve()
    app = None
    try:
        # Before Gradio is imported: it reads these once. Uploads, cached files and examples all live
        # in the app folder, the only one it will serve or accept a file path from.
        os.environ["GRADIO_TEMP_DIR"] = str(folder / "gradio")
        os.environ["GRADIO_EXAMPLES_CACHE"] = str(folder / "gradio" / "examples")
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        explorer = explorer_factory(folder)
        app = build_app(
            explorer, copy_examples(folder / "gradio" / "examples"), folder / "gradio" / "results"
        )
        app.queue(default_concurrency_limit=1)
        try:
            app.launch(
                server_name=host,
                server_port=port,
                max_file_size=max_upload,
                share=False,
                show_error=True,  # our messages, raised as gr.Error, reach the API client
                footer_links=["api"],
                prevent_thread_lock=True,
                quiet=True,
                ssr_mode=False,
            )
        except OSError as err:  # the port was taken while the model loaded
            raise LavaError(f"cannot listen on {host}:{port}: {err}") from None
        if ready is not None:
            ready(f"ready: {app.local_url}")
        if not block:
            return app, folder

        def stop(signum, frame):
            raise KeyboardInterrupt  # a plain `kill` stops the server as Ctrl+C does, folder removed too

        signal.signal(signal.SIGTERM, stop)
        app.block_thread()
    except BaseException:
        if app is not None:
            app.close()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    app.close()
    shutil.rmtree(folder, ignore_errors=True)
    return app, folder


__all__ = ["build_app", "check_port", "copy_examples", "require_gradio", "serve"]
