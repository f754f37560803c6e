"""Trained models that ship inside packages, with real data and their task metric (issue 21, acceptance 2).

No model hub is reachable, so the trained models come from a registry package: ``rapidocr-onnxruntime``
(:data:`PACKAGE_VERSION`, Apache-2.0) ships PaddleOCR's PP-OCR models as ONNX files inside its wheel:

- ``det`` (``ch_PP-OCRv4_det_infer.onnx``, 4.7 MB): DBNet text detection, a CNN (PP-LCNet/MobileNetV3-style
  backbone with squeeze-excitation, an FPN neck with nearest Resize, a ConvTranspose head); it outputs a text
  probability map of the input's size.
- ``cls`` (``ch_ppocr_mobile_v2.0_cls_infer.onnx``, 0.6 MB): a MobileNetV3-small text-orientation classifier
  (0 or 180 degrees), a CNN with a Softmax head.
- ``rec`` (``ch_PP-OCRv4_rec_infer.onnx``, 10.9 MB): SVTR-LCNet text recognition: a CNN backbone, then an SVTR
  neck of two pre-norm transformer blocks (self-attention over the 40 columns, LayerNorm decomposed into
  ReduceMean/Sub/Pow/Sqrt/Div, Swish MLP) and a CTC head over 6,625 characters: the ViT-like model.

Only the ONNX files are read (the package is never imported: it needs OpenCV). Their inputs are
``[N, 3, H, W]``, BGR, ``(x / 255 - 0.5) / 0.5``; PaddleOCR exports the dynamic dimensions as ``-1``, so
:func:`static_model` fixes the shape a test compiles for.

The real data is scikit-image's scanned page (``skimage.data.page()``, 191 x 384): its seven lines of text,
transcribed by hand in :data:`PAGE_LINES`, and the 39 words of its first five lines (cut at the gaps of the ink's
column profile). Calibration (:func:`calibration`) never reads the crops the metric reads: half of it is text
rendered with Pillow's bundled font from sentences that are not on the page (:func:`rendered_text`; for the
detector also two photographs), half windows of the page at random places and sizes (for the detector the page
zoomed 1.2 to 2 times, where the metric reads it whole). Rendered text alone calibrates the classifier a few
points worse: scanned and rendered glyphs do not reach the same activation ranges.

Each model's task metric, in percent (:class:`Case`):

- ``cls``: top-1 accuracy of the orientation of 62 word crops (39 words and 23 adjacent word pairs), each
  upright and turned by 180 degrees (124 samples; the truth is known by construction).
- ``rec``: character accuracy, ``1 - sum(edit distance) / sum(len(truth))`` with spaces ignored (PaddleOCR's
  ``RecMetric(ignore_space=True)``), of the CTC greedy decoding on 56 crops: the 39 words, 15 phrases of them
  and the two other lines of the page, each 48 x 320 as PaddleOCR feeds its recognizer.
- ``det``: the detector's task metric, F1 of the page's seven text lines found as boxes (:func:`line_f1`, IoU
  >= 0.5, boxes from the text pixels at probability > 0.3, DBNet's binarisation threshold), on the page resized
  to 192 x 384. The F1 of the text pixels against the float model's own is reported next to it (a stricter,
  pixel-level agreement: 93 on 2026-12-04, where the boxes agree fully).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

PACKAGE = "rapidocr_onnxruntime"
PACKAGE_VERSION = "1.4.4"
INSTALL_HINT = f"pip install rapidocr-onnxruntime=={PACKAGE_VERSION} (the 'models' extra)"

#: model -> its file inside the package
MODEL_FILES = {
    "det": "models/ch_PP-OCRv4_det_infer.onnx",
    "cls": "models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "rec": "models/ch_PP-OCRv4_rec_infer.onnx",
}
#: what each model is, for reports
DESCRIPTIONS = {
    "det": "PP-OCRv4 DBNet text detector (CNN)",
    "cls": "PP-OCR v2.0 MobileNetV3 orientation classifier (CNN)",
    "rec": "PP-OCRv4 SVTR-LCNet text recognizer (CNN + transformer blocks)",
}
MODELS = tuple(MODEL_FILES)

#: accuracy allowed to go, in points of the task metric (issue 21, acceptance 2)
TOLERANCE_POINTS = 1.0

DET_SHAPE = (1, 3, 192, 384)  # the page, 191 x 384, at a multiple of 32
CLS_SHAPE = (8, 3, 48, 192)  # PaddleOCR's cls_image_shape, batches of 8
REC_SHAPE = (4, 3, 48, 320)  # PaddleOCR's rec_img_shape, batches of 4
DET_THRESHOLD = 0.3  # DBNet's binarisation threshold (rapidocr's config.yaml)
LINE_IOU = 0.5
#: calibration batches per model (128 crops for cls, 64 for rec, 8 pages and 2 photos for det)
CALIBRATION_BATCHES = {"det": 8, "cls": 16, "rec": 16}


class PackageMissingError(ImportError):
    """The package that ships the trained models is not installed."""


# --- the models -----------------------------------------------------------------------------------------------


def package_dir() -> Path:
    """The installed package's folder, found without importing it.

    Raises:
        PackageMissingError: ``rapidocr-onnxruntime`` is not installed.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PackageMissingError(f"the trained OCR models come in {PACKAGE}: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def model_path(name: str) -> Path:
    """The ONNX file of ``name`` (one of :data:`MODELS`) inside the installed package."""
    if name not in MODEL_FILES:
        raise KeyError(f"unknown trained model {name!r}; known: {MODELS}")
    path = package_dir() / MODEL_FILES[name]
    if not path.is_file():
        raise PackageMissingError(f"{path} is missing: {INSTALL_HINT}")
    return path


def static_model(name: str, shape: Sequence[int]) -> onnx.ModelProto:
    """``name``'s ONNX model with its input fixed to ``shape``.

    PaddleOCR's exporter writes dynamic dimensions as ``dim_value: -1`` (not as a symbol), which a checker
    takes for a fixed size of -1; the input gets ``shape``, and the shapes recorded on the outputs and inner
    values are dropped so that shape inference derives them again.
    """
    model = onnx.load(str(model_path(name)))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != len(shape):
        raise ValueError(f"{name}: input of rank {len(dims)}, shape {tuple(shape)} given")
    for dim, size in zip(dims, shape, strict=True):
        dim.Clear()
        dim.dim_value = int(size)
    for value in list(model.graph.output) + list(model.graph.value_info):
        value.type.tensor_type.ClearField("shape")
    return model


@functools.cache
def characters() -> tuple[str, ...]:
    """The recognizer's CTC alphabet: blank, the 6,623 characters stored in its metadata, and a space."""
    model = onnx.load(str(model_path("rec")), load_external_data=False)
    stored = {prop.key: prop.value for prop in model.metadata_props}["character"]
    return ("", *stored.splitlines(), " ")


def ctc_decode(probabilities: np.ndarray) -> list[str]:
    """Greedy CTC decoding of ``[N, T, classes]``: best class per step, repeats merged, blanks dropped."""
    alphabet = characters()
    texts = []
    for best in np.asarray(probabilities).argmax(axis=-1):
        keep = np.ones(len(best), dtype=bool)
        keep[1:] = best[1:] != best[:-1]
        keep &= best != 0
        texts.append("".join(alphabet[i] for i in best[keep]))
    return texts


@functools.cache
def _session(name: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # PaddleOCR's files carry unused initializers that onnxruntime warns about
    return ort.InferenceSession(str(model_path(name)), options, providers=["CPUExecutionProvider"])


def run_float(name: str, inputs: np.ndarray) -> np.ndarray:
    """The shipped float model in onnxruntime."""
    session = _session(name)
    return np.asarray(session.run(None, {session.get_inputs()[0].name: inputs})[0])


# --- preprocessing (PaddleOCR's, with bilinear resizing as OpenCV's INTER_LINEAR) -----------------------------


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of ``[H, W, C]`` (half-pixel centres, no antialiasing, as ``cv2.resize``), float32."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def normalize(image: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` in 0..255 to the models' ``[3, H, W]``: ``(x / 255 - 0.5) / 0.5``."""
    return ((np.asarray(image, np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def text_line_input(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """A text crop as PaddleOCR feeds its classifier and recognizer: resized to ``height`` keeping its aspect
    (squeezed to ``width`` if wider), normalised, zero-padded on the right to ``[3, height, width]``."""
    resized_width = min(width, int(np.ceil(height * image.shape[1] / image.shape[0])))
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :resized_width] = normalize(resize(image, height, resized_width))
    return out


def as_bgr(gray: np.ndarray) -> np.ndarray:
    """A grey image as three equal channels (BGR or RGB alike)."""
    return np.repeat(np.asarray(gray)[..., None], 3, axis=-1)


# --- real data: scikit-image's scanned page -------------------------------------------------------------------

Box = tuple[int, int, int, int]  # top, bottom, left, right (pixels of the page, bottom and right exclusive)


@dataclass(frozen=True)
class TextLine:
    box: Box
    text: str


#: the page's lines, boxes and transcriptions by hand (the sixth line is skewed; the seventh is code)
PAGE_LINES: tuple[TextLine, ...] = (
    TextLine((8, 36, 4, 296), "Region-based segmentation"),
    TextLine((45, 66, 2, 382), "Let us first determine markers of the coins and the"),
    TextLine((63, 85, 2, 382), "background. These markers are pixels that we can label"),
    TextLine((81, 103, 2, 382), "unambiguously as either object or background. Here,"),
    TextLine((99, 120, 2, 382), "the markers are found at the two extreme parts of the"),
    TextLine((112, 142, 2, 175), "histogram of grey values:"),
    TextLine((166, 191, 20, 240), ">>> markers = np.zeros_like(coins)"),
)
WORD_LINES = 5  # the first five lines are straight: their words are cut at the gaps of the ink


@functools.cache
def page() -> np.ndarray:
    """scikit-image's scanned page, ``[191, 384]`` uint8."""
    try:
        import skimage.data
    except ImportError as exc:  # pragma: no cover - a dev dependency
        raise PackageMissingError("the page comes with scikit-image (pip install -e '.[dev]')") from exc
    return np.asarray(skimage.data.page())


def crop(box: Box) -> np.ndarray:
    top, bottom, left, right = box
    return as_bgr(page()[top:bottom, left:right])


def _word_boxes(line: TextLine, gap: int = 5) -> list[Box]:
    """The words of a straight line: runs of columns with ink (darker than the local background by 25) that
    are separated by more than ``gap`` columns without."""
    from scipy.ndimage import uniform_filter

    top, bottom, left, right = line.box
    image = page().astype(np.float32)
    background = uniform_filter(image, 31)
    ink = (image[top:bottom, left:right] < background[top:bottom, left:right] - 25).any(axis=0)
    columns = np.flatnonzero(ink)
    breaks = np.flatnonzero(np.diff(columns) > gap)
    starts = np.r_[columns[0], columns[breaks + 1]]
    ends = np.r_[columns[breaks], columns[-1]] + 1
    return [(top, bottom, left + int(s), left + int(e)) for s, e in zip(starts, ends, strict=True)]


@functools.cache
def page_words() -> tuple[TextLine, ...]:
    """The words of the page's first five lines, each with its box and its transcription."""
    words = []
    for line in PAGE_LINES[:WORD_LINES]:
        boxes, texts = _word_boxes(line), line.text.split()
        if len(boxes) != len(texts):
            raise RuntimeError(f"cut {len(boxes)} words from {line.text!r}, which has {len(texts)}")
        words += [TextLine(box, text) for box, text in zip(boxes, texts, strict=True)]
    return tuple(words)


def _line_words() -> list[list[TextLine]]:
    by_line: dict[tuple[int, int], list[TextLine]] = {}
    for word in page_words():
        by_line.setdefault(word.box[:2], []).append(word)
    return list(by_line.values())


def _span(words: Sequence[TextLine]) -> TextLine:
    first, last = words[0], words[-1]
    return TextLine((first.box[0], first.box[1], first.box[2], last.box[3]), " ".join(w.text for w in words))


def page_phrases(aspect: float) -> tuple[TextLine, ...]:
    """Consecutive words of each straight line grouped greedily into phrases no wider than ``aspect`` times
    their height, then the two lines that are not cut into words."""
    phrases = []
    for words in _line_words():
        start = 0
        while start < len(words):
            end = start + 1
            height = words[start].box[1] - words[start].box[0]
            while end < len(words) and words[end].box[3] - words[start].box[2] <= aspect * height:
                end += 1
            phrases.append(_span(words[start:end]))
            start = end
    return (*phrases, *PAGE_LINES[WORD_LINES:])


def word_pairs(aspect: float) -> tuple[TextLine, ...]:
    """Adjacent word pairs of each straight line no wider than ``aspect`` times their height."""
    pairs = []
    for words in _line_words():
        for first, second in itertools.pairwise(words):
            if second.box[3] - first.box[2] <= aspect * (first.box[1] - first.box[0]):
                pairs.append(_span([first, second]))
    return tuple(pairs)


# --- calibration: rendered text, never the page ---------------------------------------------------------------

CALIBRATION_TEXT = (
    "Quantization maps real numbers to a small set of integers with a scale and a zero point.",
    "The compiler lowers every operator to integer arithmetic and checks it against a simulation.",
    "Calibration runs the float model on a few batches and records the range of every activation.",
    "Weights are stored as signed bytes per output channel; activations use one scale per tensor.",
    "A rounding shift replaces each division, so the code needs no floating point unit at all.",
    "Small models for phones read receipts, street signs and printed forms in many languages.",
    "Version 2.4 was released on 17 March; see section 3.1, table 5 and figure 12 for details.",
)


def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def rendered_text(text: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """``text`` in Pillow's bundled font at ``size`` pixels, dark on a light grey that varies, with a little
    blur and noise: ``[H, W]`` uint8, a margin of a quarter of the size around the ink."""
    from PIL import Image, ImageDraw, ImageFilter

    font = _font(size)
    left, top, right, bottom = font.getbbox(text)
    margin = max(2, size // 4)
    background, ink = int(rng.integers(170, 250)), int(rng.integers(0, 90))
    image = Image.new("L", (right - left + 2 * margin, bottom - top + 2 * margin), background)
    ImageDraw.Draw(image).text((margin - left, margin - top), text, font=font, fill=ink)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 0.8))))
    noisy = np.asarray(image, np.float32) + rng.normal(0.0, 4.0, (image.height, image.width))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _calibration_words(rng: np.random.Generator, count: int, most: int) -> list[str]:
    words = " ".join(CALIBRATION_TEXT).split()
    out = []
    for _ in range(count):
        start, length = int(rng.integers(len(words))), int(rng.integers(1, most + 1))
        out.append(" ".join(words[start : start + length]) or words[0])
    return out


def _text_canvas(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A ``[height, width]`` page of rendered lines at random sizes and positions on a shaded background."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    slope_y, slope_x = rng.uniform(-40, 40, size=2)
    canvas = np.clip(200 + slope_y * yy / height + slope_x * xx / width, 120, 255)
    row = int(rng.integers(2, 12))
    while row < height - 10:
        size = int(rng.integers(10, 24))
        line = rendered_text(" ".join(_calibration_words(rng, 1, 9)), size, rng).astype(np.float32)
        line = line[: height - row, : width - 4]
        left = int(rng.integers(0, max(1, width - line.shape[1])))
        darkness = np.clip(np.median(line) - line, 0, None)  # the ink, on the canvas's own background
        canvas[row : row + line.shape[0], left : left + line.shape[1]] -= darkness
        row += line.shape[0] + int(rng.integers(0, 10))
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _photo(name: str) -> np.ndarray:
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    image = as_bgr(image) if image.ndim == 2 else image[..., :3][..., ::-1]
    return np.ascontiguousarray(image)


def page_window(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A window of the page at a random place (clipped to the page), three channels."""
    rows, cols = page().shape
    height, width = min(height, rows), min(width, cols)
    top, left = int(rng.integers(0, rows - height + 1)), int(rng.integers(0, cols - width + 1))
    return crop((top, top + height, left, left + width))


def _line_samples(rng: np.random.Generator, count: int, source: str, most_words: int, aspect: float) -> list[Any]:
    """``count`` text-line images: rendered text, random windows of the page, or alternately both."""
    samples = []
    for i in range(count):
        if source == "rendered" or (source == "mixed" and i % 2 == 0):
            text = " ".join(_calibration_words(rng, 1, most_words))
            samples.append(as_bgr(rendered_text(text, int(rng.integers(14, 36)), rng)))
        else:
            height = int(rng.integers(16, 32))
            samples.append(page_window(rng, height, int(height * rng.uniform(1.0, aspect))))
    return samples


def calibration(name: str, batches: int | None = None, seed: int = 0, source: str = "mixed") -> list[np.ndarray]:
    """Calibration batches for ``name``, of its compiled shape (:data:`CALIBRATION_BATCHES` of them unless
    ``batches`` says).

    ``source``: ``"rendered"``, text rendered in Pillow's font (and for ``det`` two photographs); ``"page"``,
    windows of the page at random places and sizes, never the boxes the metric reads (``det``: the page zoomed
    1.2 to 2 times, where the metric reads it whole); ``"mixed"`` (the default), half of each.
    """
    if source not in ("rendered", "page", "mixed"):
        raise ValueError(f"source: {source!r}; use 'rendered', 'page' or 'mixed'")
    if name not in MODEL_FILES:
        raise KeyError(f"unknown trained model {name!r}; known: {MODELS}")
    batches = CALIBRATION_BATCHES[name] if batches is None else batches
    rng = np.random.default_rng(seed)
    if name == "det":
        _, _, height, width = DET_SHAPE
        images = []
        for i in range(batches):
            if source == "rendered" or (source == "mixed" and i % 2 == 0):
                images.append(as_bgr(_text_canvas(rng, height, width)))
            else:
                zoom = rng.uniform(1.2, 2.0)
                images.append(resize(page_window(rng, round(191 / zoom), round(384 / zoom)), height, width))
        if source != "page":
            images += [resize(_photo(photo), height, width) for photo in ("coffee", "chelsea")]
        return [normalize(image)[None] for image in images]
    if name == "cls":
        count, _, height, width = CLS_SHAPE
        lines = _line_samples(rng, count * batches // 2, source, 2, width / height)
        crops = [text_line_input(line, height, width) for line in lines]
        samples = np.stack(crops + [c[:, ::-1, ::-1] for c in crops])
        samples = samples[rng.permutation(len(samples))]
        return [np.ascontiguousarray(samples[i : i + count]) for i in range(0, len(samples), count)]
    if name == "rec":
        count, _, height, width = REC_SHAPE
        lines = _line_samples(rng, count * batches, source, 4, width / height)
        crops = [text_line_input(line, height, width) for line in lines]
        return [np.stack(crops[i : i + count]) for i in range(0, len(crops), count)]
    raise KeyError(f"unknown trained model {name!r}; known: {MODELS}")


# --- the metrics ----------------------------------------------------------------------------------------------


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def character_accuracy(predictions: Sequence[str], truths: Sequence[str]) -> float:
    """``100 * (1 - sum(edit distance) / sum(len(truth)))``, spaces ignored."""
    pairs = [(p.replace(" ", ""), t.replace(" ", "")) for p, t in zip(predictions, truths, strict=True)]
    return 100.0 * (1.0 - sum(edit_distance(p, t) for p, t in pairs) / sum(len(t) for _, t in pairs))


def mask_f1(predicted: np.ndarray, reference: np.ndarray, threshold: float = DET_THRESHOLD) -> float:
    """F1, in percent, of the pixels above ``threshold`` in ``predicted`` against those in ``reference``."""
    p, r = np.asarray(predicted) > threshold, np.asarray(reference) > threshold
    total = int(p.sum() + r.sum())
    return 100.0 if total == 0 else 100.0 * 2.0 * float((p & r).sum()) / total


def _iou(a: Box, b: Box) -> float:
    height = min(a[1], b[1]) - max(a[0], b[0])
    width = min(a[3], b[3]) - max(a[2], b[2])
    if height <= 0 or width <= 0:
        return 0.0
    inter = height * width
    return inter / ((a[1] - a[0]) * (a[3] - a[2]) + (b[1] - b[0]) * (b[3] - b[2]) - inter)


def text_boxes(probability: np.ndarray, threshold: float = DET_THRESHOLD, min_area: int = 20) -> list[Box]:
    """DBNet's boxes, simplified: connected regions of ``[H, W]`` above ``threshold``, each box grown by the
    region's shrink (DBNet's unclip of 1.6: area x 1.6 / perimeter on each side)."""
    from scipy import ndimage

    labels, _ = ndimage.label(np.asarray(probability) > threshold)
    boxes = []
    for found in ndimage.find_objects(labels):
        if found is None:
            continue
        top, bottom, left, right = found[0].start, found[0].stop, found[1].start, found[1].stop
        height, width = bottom - top, right - left
        if height * width < min_area:
            continue
        grow = round(height * width * 1.6 / (2 * (height + width)))
        boxes.append((top - grow, bottom + grow, left - grow, right + grow))
    return boxes


def line_f1(boxes: Sequence[Box], truths: Sequence[Box], iou: float = LINE_IOU) -> float:
    """F1, in percent, of ``boxes`` matched one to one (greedily, best IoU first) to ``truths`` at ``iou``."""
    pairs = sorted(((_iou(b, t), i, j) for i, b in enumerate(boxes) for j, t in enumerate(truths)), reverse=True)
    used_b: set[int] = set()
    used_t: set[int] = set()
    for score, i, j in pairs:
        if score >= iou and i not in used_b and j not in used_t:
            used_b.add(i)
            used_t.add(j)
    matched = len(used_b)
    return 100.0 * 2.0 * matched / (len(boxes) + len(truths)) if boxes or truths else 100.0


# --- the cases ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One trained model ready to compile: the model of its compiled shape, calibration batches, the real
    inputs (a multiple of the batch) and ``score(outputs)``, the task metric in percent."""

    name: str
    model: onnx.ModelProto
    calibration: list[np.ndarray]
    inputs: np.ndarray
    batch: int
    score: Callable[[np.ndarray], float]
    metric: str
    extra: Callable[[np.ndarray], dict[str, Any]] = field(default=lambda outputs: {})

    def run(self, function: Callable[[np.ndarray], Any]) -> np.ndarray:
        """``function`` (the compiled model, or :func:`run_float` bound to the model) over every batch."""
        outputs = []
        for start in range(0, len(self.inputs), self.batch):
            result = function(self.inputs[start : start + self.batch])
            outputs.append(np.asarray(result[0] if isinstance(result, list | tuple) else result))
        return np.concatenate(outputs)

    def run_float(self) -> np.ndarray:
        return self.run(functools.partial(run_float, self.name))


def _pad(samples: np.ndarray, batch: int) -> np.ndarray:
    extra = -len(samples) % batch
    return np.concatenate([samples, np.zeros((extra, *samples.shape[1:]), samples.dtype)]) if extra else samples


def _det_case() -> Case:
    _, _, height, width = DET_SHAPE
    image = resize(as_bgr(page()), height, width)
    inputs = normalize(image)[None]
    reference = run_float("det", inputs)
    scale_y, scale_x = height / page().shape[0], width / page().shape[1]
    truths = [
        (round(t * scale_y), round(b * scale_y), round(le * scale_x), round(r * scale_x))
        for (t, b, le, r) in (line.box for line in PAGE_LINES)
    ]
    return Case(
        name="det",
        model=static_model("det", DET_SHAPE),
        calibration=calibration("det"),
        inputs=inputs,
        batch=1,
        score=lambda outputs: line_f1(text_boxes(outputs[0, 0]), truths),
        metric="F1 of the page's text lines found as boxes (IoU >= 0.5), on the page at 192 x 384",
        extra=lambda outputs: {"pixel_f1": mask_f1(outputs, reference)},
    )


def _cls_case() -> Case:
    count, _, height, width = CLS_SHAPE
    aspect = width / height
    crops = [crop(line.box) for line in (*page_words(), *word_pairs(aspect))]
    upright = [text_line_input(c, height, width) for c in crops]
    turned = [text_line_input(np.ascontiguousarray(c[::-1, ::-1]), height, width) for c in crops]
    labels = np.r_[np.zeros(len(upright), np.int64), np.ones(len(turned), np.int64)]
    inputs = _pad(np.stack(upright + turned), count)

    def score(outputs: np.ndarray) -> float:
        return 100.0 * float((outputs[: len(labels)].argmax(axis=-1) == labels).mean())

    return Case(
        name="cls",
        model=static_model("cls", CLS_SHAPE),
        calibration=calibration("cls"),
        inputs=inputs,
        batch=count,
        score=score,
        metric=f"top-1 orientation accuracy on {len(labels)} word crops of the page (0 and 180 degrees)",
    )


def _rec_case() -> Case:
    count, _, height, width = REC_SHAPE
    lines = (*page_words(), *page_phrases(width / height))
    truths = [line.text for line in lines]
    inputs = _pad(np.stack([text_line_input(crop(line.box), height, width) for line in lines]), count)

    def score(outputs: np.ndarray) -> float:
        return character_accuracy(ctc_decode(outputs[: len(truths)]), truths)

    def extra(outputs: np.ndarray) -> dict[str, Any]:
        texts = ctc_decode(outputs[: len(truths)])
        same = [p.replace(" ", "") == t.replace(" ", "") for p, t in zip(texts, truths, strict=True)]
        return {"exact": 100.0 * float(np.mean(same)), "texts": texts}

    return Case(
        name="rec",
        model=static_model("rec", REC_SHAPE),
        calibration=calibration("rec"),
        inputs=inputs,
        batch=count,
        score=score,
        metric=f"character accuracy (spaces ignored) on {len(truths)} word and phrase crops of the page",
        extra=extra,
    )


def load_case(name: str) -> Case:
    """The :class:`Case` of ``name`` (one of :data:`MODELS`)."""
    builders = {"det": _det_case, "cls": _cls_case, "rec": _rec_case}
    if name not in builders:
        raise KeyError(f"unknown trained model {name!r}; known: {MODELS}")
    return builders[name]()


# --- the evaluation -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedResult:
    """Float and quantized task metric of one trained model, and how it compiled."""

    model: str
    metric: str
    float_score: float
    quantized_score: float
    integer_only: bool
    refusal: tuple[str, str, str] | None  # (node, op, message) of the strict compile's UnsupportedOpError
    float_islands: tuple[tuple[str, str], ...]  # (node, op) kept in float when integer_only is False
    recipe: str
    compile_seconds: float
    float_extra: dict[str, Any] = field(default_factory=dict)
    quantized_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> bool:
        return self.quantized_score >= self.float_score - TOLERANCE_POINTS


def evaluate(name: str, recipe: Any = "auto") -> TrainedResult:
    """Compile ``name`` integer-only; if that is refused (a named :class:`~qcompiler.errors.UnsupportedOpError`)
    compile it again with float islands. Any other error propagates."""
    import qcompiler
    from qcompiler.errors import UnsupportedOpError

    case = load_case(name)
    reference = case.run_float()
    refusal = None
    start = time.perf_counter()
    try:
        compiled = qcompiler.compile(case.model, calibration=case.calibration, recipe=recipe, progress=False)
    except UnsupportedOpError as refused:
        refusal = (refused.node_name, refused.op_type, str(refused))
        start = time.perf_counter()
        compiled = qcompiler.compile(
            case.model, calibration=case.calibration, recipe=recipe, progress=False, integer_only=False
        )
    seconds = time.perf_counter() - start
    outputs = case.run(compiled)
    islands = tuple((island["node"], island["op"]) for island in compiled.report.get("float_islands", []))
    return TrainedResult(
        model=name,
        metric=case.metric,
        float_score=case.score(reference),
        quantized_score=case.score(outputs),
        integer_only=refusal is None,
        refusal=refusal,
        float_islands=islands,
        recipe=str(compiled.report.get("recipe")),
        compile_seconds=seconds,
        float_extra=case.extra(reference),
        quantized_extra=case.extra(outputs),
    )
