"""What the ``lava explore`` page does when a widget changes: one handler per kind of request,
each built over the ``Explorer`` and the folder its download files go to.

Handlers never raise into Gradio: bad input becomes lava's one-line message in the status box
(the ``/segment`` API endpoint raises ``gr.Error`` with it). The page's handlers take the
widgets' values as named parameters, in the order of ``app.wire``'s ``reading`` list: they
are the ``/explore`` and ``/grid`` endpoints' parameter names.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from ..errors import LavaError
from .render import grid_image, heat_gallery, write_downloads
from .session import Explorer, error_message, parse_blocks, parse_timesteps, settings_from_ui

RESULT_AGE_S = 3600  # result folders older than this are removed as new ones are made

# The widget values ``settings_from_ui`` reads, by the names the handlers take them under.
SETTINGS = (
    "classes",
    "timestep",
    "blocks",
    "source",
    "direction",
    "softmax",
    "tokens",
    "seed",
    "normalize",
    "background",
    "background_threshold",
    "min_presence",
    "refine",
)


def fresh_folder(results_dir: Path, max_age: float = RESULT_AGE_S) -> Path:
    """A new folder for one request's files; folders of requests older than ``max_age`` seconds are
    removed first, so a long-running server does not fill the disk."""
    now = time.time()
    for old in results_dir.iterdir():
        try:
            if now - old.stat().st_mtime > max_age:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:  # removed by a concurrent request
            pass
    return Path(tempfile.mkdtemp(dir=results_dir))


def describe_result(result, sigma: float, seconds: float) -> str:
    """The status line of a segmentation: classes, timestep, blocks, view, background, cost."""
    s = result.settings
    r = s.recipe.reading
    ran = (
        f"{result.forwards} model forward in {seconds:.2f} s"
        if result.forwards
        else f"maps from this session's cache, no model run ({seconds:.2f} s)"
    )
    blocks = ", ".join(map(str, s.layers))
    mean = " (mean)" if len(s.layers) > 1 else ""
    threshold = s.recipe.mask.background_threshold
    bg = {"threshold": f"background below {threshold:g}", "none": "no background"}.get(
        s.background, "background named as a class"
    )
    return (
        f"**{len(s.classes)} classes** · t = {s.timestep:g} (σ {sigma:.3f}) · blocks {blocks}{mean} · "
        f"{r.source}{'' if r.source == 'concept' else f' {r.direction}/{r.softmax}'} · {bg} · {ran}"
    )


def progress_of(progress):
    """Gradio's progress bar as the ``Explorer``'s ``(fraction, message)`` callback."""
    return lambda fraction, message: progress(fraction, desc=message)


def page_settings(explorer: Explorer, values: dict):
    """The ``Settings`` of the page's widget ``values`` (a handler's parameters by name)."""
    return settings_from_ui(explorer.backend, **{name: values[name] for name in SETTINGS})


def segment_handler(gr, explorer: Explorer, results_dir: Path):
    """The page's Segment button (and every widget that re-runs it): ``/explore``."""
    backend = explorer.backend

    def segment_ui(
        image,
        classes,
        timestep,
        blocks,
        source,
        direction,
        softmax,
        tokens,
        seed,
        normalize,
        background,
        background_threshold,
        min_presence,
        refine,
        session,
        progress=gr.Progress(),  # noqa: B008 (how Gradio hands a handler its progress bar)
    ):
        """Segment with every reading and mask option of the page; returns the status line, the
        overlay, the label map, one heatmap per class and the download files."""
        session = session or explorer.new_cache()
        start = time.perf_counter()
        try:
            settings = page_settings(explorer, locals())
            result = explorer.run(session, image, settings, progress_of(progress))
            files = write_downloads(fresh_folder(results_dir), result, Path(image).stem or "image")
        except Exception as err:  # shown in the page; the server keeps serving
            return (f"**error:** {error_message(err)}", *[gr.skip()] * 5, session)
        names = list(settings.classes)
        seconds = time.perf_counter() - start
        return (
            describe_result(result, backend.sigma_for_timestep(settings.timestep), seconds),
            str(files[1]),
            str(files[0]),
            heat_gallery(result),
            [str(f) for f in files],
            gr.Dropdown(choices=names, value=names[0]),
            session,
        )

    return segment_ui


def grid_handler(gr, explorer: Explorer):
    """The timestep × block grid's button: ``/grid``."""
    backend = explorer.backend

    def grid_ui(
        image,
        classes,
        timestep,
        blocks,
        source,
        direction,
        softmax,
        tokens,
        seed,
        normalize,
        background,
        background_threshold,
        min_presence,
        refine,
        grid_class,
        grid_timesteps,
        grid_blocks,
        session,
        progress=gr.Progress(),  # noqa: B008
    ):
        """One class's map at each timestep × block (and their mean): one forward per timestep."""
        session = session or explorer.new_cache()
        start = time.perf_counter()
        try:
            settings = page_settings(explorer, locals())
            chosen = grid_class or settings.classes[0]
            if not grid_blocks:
                raise LavaError("no block ticked for the grid: tick at least one")
            layers = parse_blocks(backend, grid_blocks)
            times = parse_timesteps(backend, grid_timesteps)
            result = explorer.grid(session, image, settings, chosen, times, layers, progress_of(progress))
            picture = grid_image(result)
        except Exception as err:
            return f"**error:** {error_message(err)}", gr.skip(), session
        note = (
            f"{len(result.timesteps)} timesteps × {len(result.columns)} columns for {chosen!r}: "
            f"{result.forwards} model forward(s), {time.perf_counter() - start:.2f} s"
        )
        return note, picture, session

    return grid_ui


def api_handler(gr, explorer: Explorer, results_dir: Path):
    """The ``/segment`` API endpoint: an image and class names in, the model's defaults."""

    def segment_api(image_path, classes_text):
        """Segment an image into comma-separated classes with the model's defaults: returns the
        overlay (with a legend) and the label map (palette PNG, pixel value i = i-th class;
        16-bit grayscale beyond 256 labels)."""
        try:
            settings = explorer.default_settings(classes_text)
            result = explorer.run(explorer.new_cache(), image_path, settings)
            files = write_downloads(fresh_folder(results_dir), result, "api")
        except Exception as err:
            raise gr.Error(error_message(err), print_exception=False) from None
        return str(files[1]), str(files[0])

    return segment_api


def example_handler(gr, examples: dict[str, tuple[Path, str]]):
    """Picking a shipped example fills the image and the class names."""

    def load_example(name):
        if name not in examples:
            return gr.skip(), gr.skip()
        path, names = examples[name]
        return str(path), names

    return load_example


def sigma_handlers(gr, explorer: Explorer, segment_ui):
    """``(sigma_to_t, t_to_sigma, segment_at_sigma)``: the σ box and the timestep slider follow each
    other, and Enter in the σ box runs at its timestep."""
    backend = explorer.backend

    def sigma_to_t(s):
        try:
            return backend.timestep_for_sigma(float(s))
        except (LavaError, TypeError, ValueError):
            return gr.skip()

    def t_to_sigma(t):
        return round(backend.sigma_for_timestep(float(t)), 4)

    def segment_at_sigma(
        sigma_value,
        image,
        classes,
        timestep,
        *rest,
        progress=gr.Progress(),  # noqa: B008
    ):
        """Run at the timestep of ``sigma_value`` (lava's message when it is out of range) and
        move the slider there."""
        try:
            if sigma_value is None:
                raise LavaError("σ is empty: enter a noise level in [0, 1)")
            t = backend.timestep_for_sigma(float(sigma_value))
            backend.check_timestep(t)
        except (LavaError, TypeError, ValueError) as err:
            return (f"**error:** {error_message(err)}", *[gr.skip()] * 6, gr.skip())
        return (*segment_ui(image, classes, t, *rest, progress=progress), t)

    return sigma_to_t, t_to_sigma, segment_at_sigma
