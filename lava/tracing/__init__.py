"""``lava.trace``: where each word of the prompt goes while a diffusers pipeline generates.

A context manager around one ordinary ``pipe(...)`` call (DAAM's shape; docs/trace.md). While it
is open, the pipeline's ``encode_prompt`` is wrapped (to learn the prompt text and its conditional
embeddings) and the transformer has two hooks; on each traced step lava's own capture processors
(``lava.stages.capture.capturing`` with the family adapters) sit on the traced blocks for that one
transformer call. Everything is put back when the block ends, also on error; with ``impl="torch"``
the attention output comes from the fused kernel the model calls itself, so the images are
bit-identical with and without the trace.

Kept per traced block: the running sum over the traced steps of every image's image→text
probabilities (softmax over all joint keys; heads averaged) at the captured text keys,
``[B, 1, N_img, K]`` float32, the same after 2 steps or 50 (no ``N×N``, nothing per step). The step
means go through lava's one composition: ``AttentionSlices`` → ``stages.aggregate.aggregate``
(``heatmaps``), or ``compose.maps_from_slices`` and ``compose.segmentation`` with a
``config.recipe`` (``segment``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from typing import Any

import torch

from ..backends.base import Backend
from ..backends.wrap import from_pipeline
from ..errors import LavaError
from ..options import IMAGE_TO_TEXT, IMPLEMENTATIONS, JOINT
from ..stages.capture import capturing
from ..stages.prompts import parse_classes, word_spans
from ..types import CapturePlan, PromptEncoding
from .reading import TraceReading, trace_recipe

__all__ = ["Trace", "trace", "trace_recipe"]


def trace(
    pipe: Any,
    *,
    words: str | Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    steps: Iterable[int] | None = None,
    impl: str = "torch",
) -> Trace:
    """A context manager that records, during one ``pipe(...)`` call inside it, each prompt token's
    image→text attention map at ``layers`` averaged over the denoising ``steps``.

    Args:
        pipe: a diffusers ``StableDiffusion3Pipeline`` (Img2Img, Inpaint), ``FluxPipeline``
            (Img2Img), ``ChromaPipeline`` (its own float padding mask traced as the model receives
            it: lava.backends.chroma), ``Flux2KleinPipeline``, ``QwenImagePipeline`` or
            ``ZImagePipeline`` (its captions as the list of unpadded tensors the transformer takes:
            lava.backends.zimage), or a lava ``Backend`` (its ``pipe`` is traced, its defaults
            used). The pipeline's modules are neither moved nor cast
            (``lava.from_pipeline(pipe, move=False)``).
        words: the words to keep maps for (a list, or one comma-separated string): only their
            tokens are captured, and a word not in the prompt fails as soon as the pipeline has
            encoded it. ``None`` (default) keeps every text token, so any word of the prompt can
            be read afterwards (``K`` = the whole text sequence per block, still no ``N×N``).
            The model's ``"null"`` presence rule reads every token, so such a model keeps them all.
        layers: transformer blocks to trace (default: the model's, ``lava models``; negative
            counts from the end; Flux numbers double-stream blocks first, then single-stream).
        steps: denoising steps to trace, counted from 0 over the steps the call runs (an
            Img2Img call runs fewer); default every step.
        impl: ``"torch"`` (default): the attention output from the fused kernel the model calls
            itself (images bit-identical); ``"triton"``/``"naive"``: equal up to rounding.

    Classifier-free guidance: the maps are those of the **conditional** half only (the rows that
    carry the prompt, found by the family's ``conditional_rows``); SD3's unconditional batch half,
    Z-Image's negative entries (the second half of its caption list), Flux's ``true_cfg_scale`` and
    Chroma's negative-prompt calls and SD3.5's skip-layer-guidance calls are not traced. Every image of the
    batch gets its own maps (several prompts, ``num_images_per_prompt``). One pipeline call per
    ``with`` block.
    """
    backend = pipe if isinstance(pipe, Backend) else from_pipeline(pipe, move=False)
    return Trace(backend, words=words, layers=layers, steps=steps, impl=impl)


class Trace(TraceReading):
    """What ``lava.trace`` returns: the context manager, and the maps once the call has run.

    After (or inside) the block: ``heatmaps(words)`` → ``Heatmaps`` ``[B, C, h, w]`` over the
    generated images, ``segment(words)`` → ``Segmentation``; ``maps()`` the raw means per block;
    ``steps``/``timesteps`` what was traced; ``prompts`` the prompt of each generated image;
    ``nbytes`` the memory the running sums hold.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        words: str | Sequence[str] | None,
        layers: Sequence[int] | None,
        steps: Iterable[int] | None,
        impl: str,
    ):
        self.backend = backend
        self.layers = backend.check_layers(layers if layers is not None else backend.defaults.layers)
        self.words = None if words is None else parse_classes(words)
        self.step_filter = None if steps is None else frozenset(_check_steps(steps))
        if impl not in IMPLEMENTATIONS:
            raise LavaError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
        self.impl = impl
        self._entered, self._started = False, False
        self._undo: ExitStack | None = None
        self._capture: ExitStack | None = None  # the capture processors of the call running now
        self._store, self._pending = None, None
        # filled by the pipeline's encode_prompt
        self._cond = None  # the conditional text as the transformer gets it (family.prompt_rows)
        self._embeds = self._pooled = None  # one row per prompt
        self._clip_texts: tuple[str, ...] | None = None
        self._t5_texts: tuple[str, ...] | None = None
        self.images_per_prompt = 1
        self.max_sequence_length = backend.max_sequence_length
        self.text_len: int | None = None
        self.columns: tuple[int, ...] = ()
        # filled by the denoising loop
        self._step, self._last_t = -1, None
        self._seen_call = False  # a transformer call with the conditional rows has run
        self._sums: dict[int, torch.Tensor] = {}
        self._count = 0
        self.grid: tuple[int, int] | None = None
        self.steps: list[int] = []
        self.timesteps: list[float] = []

    # ---- installing and removing ---------------------------------------------------------------
    def __enter__(self) -> Trace:
        if self._entered:
            raise LavaError("a lava.trace records one pipeline call: open a new one for the next call")
        pipe = self.backend.pipe
        if getattr(vars(pipe).get("encode_prompt"), "_lava_trace", False):
            raise LavaError("this pipeline is already being traced: lava.trace blocks cannot be nested")
        self._entered = True
        undo = ExitStack()
        try:
            original = pipe.encode_prompt
            own = "encode_prompt" in vars(pipe)
            pipe.encode_prompt = self._encoder(original)
            undo.callback(_put_back, pipe, "encode_prompt", original if own else None)
            transformer = self.backend.transformer
            undo.callback(transformer.register_forward_pre_hook(self._before, with_kwargs=True).remove)
            undo.callback(transformer.register_forward_hook(self._after).remove)
            undo.callback(self._end_capture)
        except BaseException:
            undo.close()
            raise
        self._undo = undo
        return self

    def __exit__(self, *exc) -> bool:
        if self._undo is not None:
            self._undo.close()
            self._undo = None
        self._cond = None
        return False

    def _end_capture(self) -> None:  # the processors of a traced call out, the originals back
        stack, self._capture, self._store, self._pending = self._capture, None, None, None
        if stack is not None:
            stack.close()

    # ---- the prompt ----------------------------------------------------------------------------
    def _encoder(self, original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def encode_prompt(*args, **kwargs):
            if self._started:
                raise LavaError(
                    "lava.trace records one pipeline call: encode_prompt ran again after denoising "
                    "started; open a new `with lava.trace(pipe)` for each call"
                )
            first = self._cond is None  # the first call encodes the prompt (Flux's second, the negative one)
            if first:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                # the texts as given, before the call: a pipeline may rewrite its prompt list in place
                # (ZImagePipeline puts each prompt of a list inside its chat template)
                names = ("prompt", self.backend.family.t5_prompt_arg)
                texts = {name: _texts(bound.arguments.get(name)) for name in names}
            result = original(*args, **kwargs)
            if first:
                self._record_prompt(bound.arguments, texts, result)
            return result

        encode_prompt._lava_trace = True
        return encode_prompt

    def _record_prompt(self, arguments: dict, texts: dict, result) -> None:
        family = self.backend.family
        embeds, pooled = family.prompt_outputs(result)
        # encode_prompt's rows per prompt; a pipeline whose encode_prompt takes no
        # num_images_per_prompt (Z-Image) repeats them later: its transformer calls tell
        n = int(arguments.get("num_images_per_prompt") or 1)
        self.images_per_prompt = n
        self.max_sequence_length = int(arguments.get("max_sequence_length") or self.max_sequence_length)
        self.text_len = int(embeds.shape[1])
        self._cond = family.prompt_rows(result)
        # one row per prompt (the pipeline repeats each prompt's row n times, prompt-major)
        self._embeds, self._pooled = embeds[::n].clone(), pooled[::n].clone()
        clip = texts["prompt"]
        t5 = texts[family.t5_prompt_arg] or clip
        if clip is not None and t5 is not None and len(t5) != len(clip):
            t5 = t5 * len(clip) if len(t5) == 1 else None
        self._clip_texts, self._t5_texts = clip, t5
        every_key = self.words is None or self.backend.defaults.presence == "null"
        if every_key:
            self.columns = tuple(range(self.text_len))
        else:
            prompts = [self.encoding(self.words, p) for p in range(self.num_prompts)]
            self.columns = tuple(sorted({k for prompt in prompts for k in prompt.columns()}))

    @property
    def num_prompts(self) -> int:
        """Prompts the pipeline encoded (each gives ``images_per_prompt`` images)."""
        if self._embeds is None:
            raise LavaError("nothing traced yet: call the pipeline inside `with lava.trace(pipe) as tr:`")
        return int(self._embeds.shape[0])

    @property
    def num_images(self) -> int:
        return self.num_prompts * self.images_per_prompt

    @property
    def prompts(self) -> tuple[str, ...]:
        """The prompt of each generated image, in the pipeline's output order."""
        if self._clip_texts is None:
            raise LavaError("the pipeline was called with prompt_embeds: lava.trace has no prompt text")
        return tuple(t for t in self._clip_texts for _ in range(self.images_per_prompt))

    def encoding(self, words: str | Sequence[str], prompt_index: int = 0) -> PromptEncoding:
        """A ``PromptEncoding`` of prompt ``prompt_index`` whose classes are ``words`` at the token
        positions they occupy in it (every occurrence; see ``lava.stages.prompts.word_spans``)."""
        names = parse_classes(words)
        n = self.num_prompts
        if not 0 <= prompt_index < n:
            raise LavaError(f"prompt {prompt_index} does not exist: the pipeline encoded {n} prompt(s)")
        if self._clip_texts is None or self._t5_texts is None:
            raise LavaError(
                "the pipeline was called with prompt_embeds, not a prompt: lava.trace needs the "
                "prompt text to find the words"
            )
        clip_text, t5_text = self._clip_texts[prompt_index], self._t5_texts[prompt_index]
        clip_spans, t5_spans = word_spans(self.backend, names, clip_text, t5_text, self.max_sequence_length)
        return PromptEncoding(
            classes=names,
            texts=(clip_text,),
            embeds=self._embeds[prompt_index : prompt_index + 1],
            pooled=self._pooled[prompt_index : prompt_index + 1],
            clip_spans=clip_spans,
            t5_spans=t5_spans,
            clip_len=self.backend.clip_len,
            text_len=int(self.text_len),
        )

    # ---- the denoising loop --------------------------------------------------------------------
    def _before(self, transformer, args: tuple, kwargs: dict) -> None:
        """Transformer pre-hook: count the step; on a traced step with the conditional rows in
        this call, put the capture processors in for this call."""
        if self._cond is None:
            return  # not a pipeline call that encoded a prompt (or encoded only embeddings)
        self._started = True
        inputs = _call_arguments(transformer, args, kwargs)
        if inputs.get("skip_layers") is not None:
            return  # SD3.5 skip-layer guidance: a second pass that leaves blocks out
        family = self.backend.family
        grid, t = family.call_info(transformer, inputs)
        if self._last_t is None or t != self._last_t:
            self._step += 1
            self._last_t = t
        found = family.conditional_rows(inputs, self._cond)
        if found is None:
            return  # Flux's and Chroma's negative-prompt call under true CFG
        offset, count = found
        self._check_images(count)
        if self.step_filter is not None and self._step not in self.step_filter:
            return
        if self.grid is not None and grid != self.grid:
            raise LavaError(f"the image-token grid changed during the call: {self.grid} then {grid}")
        self.grid = grid
        plan = CapturePlan(
            layers=self.layers,
            columns=self.columns,
            direction=IMAGE_TO_TEXT,
            softmax=JOINT,
            heads="mean",
            impl=self.impl,
            early_exit=False,
        )
        stack = ExitStack()
        self._store = stack.enter_context(capturing(transformer, plan))
        self._capture, self._pending = stack, (offset, count, self._step, t)

    def _after(self, transformer, args: tuple, output) -> None:
        """Transformer forward hook: add this call's conditional slices to the running sums."""
        if self._store is None or self._pending is None:
            return
        offset, count, step, t = self._pending
        try:
            for block in self.layers:
                part = self._store[block][offset : offset + count]
                if block in self._sums:
                    self._sums[block].add_(part)
                else:
                    self._sums[block] = part.clone()
        finally:
            self._end_capture()
        self._count += 1
        self.steps.append(step)
        self.timesteps.append(t)

    def _check_images(self, count: int) -> None:
        """``count`` conditional batch entries in a call: ``images_per_prompt`` of each prompt, the
        same in every call (where ``encode_prompt`` did not repeat the rows, this is where the
        number of images per prompt is learned)."""
        per_prompt, rest = divmod(count, self.num_prompts)
        if rest or not per_prompt or (self._seen_call and per_prompt != self.images_per_prompt):
            raise LavaError(
                f"a transformer call carried {count} conditional rows for {self.num_prompts} prompt(s) "
                f"({self.images_per_prompt} image(s) each until then): lava.trace reads one pipeline "
                "call that generates the same images at every step"
            )
        self.images_per_prompt, self._seen_call = per_prompt, True

    # ---- results -------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by the running sums (the same after any number of steps)."""
        return sum(t.numel() * t.element_size() for t in self._sums.values())

    def maps(self) -> dict[int, torch.Tensor]:
        """``{block: [B, 1, N_img, K]}`` float32: each image's image→text joint-softmax
        probabilities at text keys ``columns`` (positions in its prompt's text sequence), heads
        averaged, the mean over the traced steps."""
        if not self._count:
            raise LavaError(
                "no denoising step was traced: call the pipeline inside the `with lava.trace(pipe)` "
                f"block (steps asked: {sorted(self.step_filter) if self.step_filter else 'all'})"
            )
        return {block: s / self._count for block, s in self._sums.items()}


def _check_steps(steps: Iterable[int]) -> list[int]:
    out = [int(s) for s in steps]
    if not out or any(s < 0 for s in out):
        raise LavaError(f"steps must be step indices 0, 1, ... counted from the first step, got {out}")
    return out


def _texts(value) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def _call_arguments(module, args: tuple, kwargs: dict) -> dict:
    """A transformer call's arguments by name (the pipelines pass keywords; positions are bound
    to the model class's ``forward``, which an offloading wrapper may hide)."""
    if not args:
        return kwargs
    bound = inspect.signature(type(module).forward).bind_partial(module, *args, **kwargs)
    return dict(bound.arguments)


def _put_back(obj, name: str, value) -> None:
    """Undo an instance attribute: drop it (the class's method shows again), or set the earlier one."""
    vars(obj).pop(name, None) if value is None else setattr(obj, name, value)
