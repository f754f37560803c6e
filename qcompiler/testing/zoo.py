"""A model zoo for issue 21 ("any model in"): architecture families built from transformers' own classes, with
random weights at small odd sizes, and the one evaluation the zoo test and ``benchmarks/bench_zoo.py`` share.

Each builder in :data:`FAMILIES` returns a :class:`ZooCase`: an eval-mode ``torch.nn.Module`` that returns one
float tensor (logits of a causal decoder, ``last_hidden_state`` of an encoder, the feature map or logits of a
vision model), one example input, calibration batches and held-out batches (disjoint seeds). Vision models see
crops of the photos scikit-image ships, normalised as for ImageNet; a model with BatchNorm first has its
statistics fitted on other crops of them (random weights give degenerate statistics, and the float model itself
would be meaningless). Text models get uniform random token ids, the Whisper encoder smooth random features.

:func:`evaluate_family` compiles a family with :func:`qcompiler.compile` and classifies the outcome:

- ``ok``: integer-only, every op within one step of ``qcompiler.simulate(..., nonlinearities="integer")``
  (:func:`qcompiler.testing.assert_lowering_matches`), centred cosine to float >= :data:`COSINE_FLOOR`;
- ``ill-conditioned``: integer-only and every op within one step of its simulation, but the float model itself
  moves below :data:`COSINE_FLOOR` under input noise at int8's level (:data:`NOISE_DB`; random depthwise CNNs
  are chaotic): no quantized model can be held to the floor there, so the cosine is recorded, not judged;
- ``low-accuracy``: compiled, but the cosine is lower or an op strays from its simulation;
- ``refused``: a named, user-facing error (:class:`~qcompiler.errors.UnsupportedOpError`,
  :class:`~qcompiler.errors.ModelLoadError`);
- ``internal-error``: any other exception, with the innermost frame of the compiler it came from.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

COSINE_FLOOR = 0.99
#: input noise (signal-to-noise ratio, dB) at which a float model's own output is checked for conditioning: about
#: the rounding noise of an int8 tensor at full range (6.02 * 8 + 1.76 dB, less a little for range headroom)
NOISE_DB = 40.0
CALIBRATION_BATCHES = 8
HELD_OUT_BATCHES = 3
LOWERING_BATCHES = 1  # the op-by-op check runs the reference interpreter: one held-out batch is enough
BATCHNORM_FIT_CROPS = 256
BATCHNORM_FIT_BATCH = 32
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# family -> why the compiler refuses it today, by name (issue 21 lists what must be built to accept each).
EXPECTED_REFUSALS: dict[str, str] = {}

Batch = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class ZooCase:
    """One family, ready to compile: ``module(*example_inputs)`` is a float tensor; the batches are tuples of
    arrays in the module's argument order (:func:`qcompiler.api.calibration_batches` takes them as they are)."""

    name: str
    module: Any  # torch.nn.Module, in eval mode
    example_inputs: tuple[Any, ...]  # torch tensors
    calibration: list[Batch]
    held_out: list[Batch]


@dataclass(frozen=True)
class ZooResult:
    """What :func:`evaluate_family` found. ``detail`` is the error message, the mismatching ops, or empty."""

    family: str
    outcome: str  # ok | ill-conditioned | low-accuracy | refused | internal-error
    compile_seconds: float | None = None
    cosine: float | None = None
    #: the float model's own centred cosine under input noise at NOISE_DB (float inputs only)
    noise_cosine: float | None = None
    lowering_matches: bool | None = None
    compared_ops: int | None = None  # integer op outputs the op-by-op check compared with the simulation
    float_ops: tuple[str, ...] = ()
    error_type: str | None = None
    error_site: str | None = None  # innermost compiler frame, file:line relative to the repository
    failed_pass: str | None = None
    stage: str | None = None  # build | compile | run | simulate | compare
    detail: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


# --- inputs ---------------------------------------------------------------------------------------------------


def _seed(name: str, purpose: str) -> int:
    return zlib.crc32(f"{name}/{purpose}".encode())


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    """The colour photos scikit-image ships (and its grey ones as three equal channels), float in [0, 1]."""
    try:
        import skimage.data
        import skimage.io
    except ImportError as exc:  # pragma: no cover - a dev dependency
        raise RuntimeError("the vision families need scikit-image (pip install -e '.[dev]')") from exc
    folder = Path(skimage.data.__file__).parent
    names = [
        "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg",
        "hubble_deep_field.jpg", "ihc.png", "camera.png", "coins.png", "moon.png", "horse.png",
    ]  # fmt: skip
    photos = []
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        image = np.asarray(skimage.io.imread(path), np.float32)
        image = image / (255.0 if image.max() > 1 else 1.0)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        photos.append(np.ascontiguousarray(image[..., :3]))
    if len(photos) < 4:
        raise RuntimeError(f"scikit-image ships too few photos under {folder}")
    return tuple(photos)


def photo_crops(count: int, size: int, seed: int) -> np.ndarray:
    """``count`` random square crops (a quarter to all of the short side, random flip) resized to ``size``,
    ImageNet-normalised, ``[count, 3, size, size]`` float32."""
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    photos = _photos()
    crops = np.empty((count, 3, size, size), np.float32)
    for i in range(count):
        photo = photos[rng.integers(len(photos))]
        height, width = photo.shape[:2]
        side = int(min(height, width) * rng.uniform(0.25, 1.0))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = resize(photo[top : top + side, left : left + side], (size, size), anti_aliasing=True)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crops[i] = ((crop - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    return crops


def _image_batches(name: str, purpose: str, count: int, size: int) -> list[Batch]:
    crops = photo_crops(count, size, _seed(name, purpose))
    return [(crops[i : i + 1],) for i in range(count)]


def _token_batches(name: str, purpose: str, count: int, vocab: int, tokens: int) -> list[Batch]:
    rng = np.random.default_rng(_seed(name, purpose))
    return [(rng.integers(0, vocab, (1, tokens), dtype=np.int64),) for _ in range(count)]


def _feature_batches(name: str, purpose: str, count: int, channels: int, frames: int) -> list[Batch]:
    """Smooth random "log-mel" features: white noise averaged over 3 frames and 3 bins, then standardised."""
    from scipy.ndimage import uniform_filter

    rng = np.random.default_rng(_seed(name, purpose))
    batches: list[Batch] = []
    for _ in range(count):
        noise = uniform_filter(rng.standard_normal((channels, frames)), size=3, mode="nearest")
        batches.append((((noise - noise.mean()) / noise.std()).astype(np.float32)[None],))
    return batches


# --- modules --------------------------------------------------------------------------------------------------


def _output_module(model: Any, argument: str, output: str, **extra: Any) -> Any:
    """``model`` behind a module of one positional argument, named ``argument`` (torch.export names the graph
    input after it), that returns ``output`` of the model's result."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def result(self, inputs: torch.Tensor) -> torch.Tensor:
            value = self.model(**{argument: inputs}, **extra)
            return value if isinstance(value, torch.Tensor) else getattr(value, output)

    class TokenIds(Wrapped):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.result(input_ids)

    class PixelValues(Wrapped):
        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.result(pixel_values)

    class InputFeatures(Wrapped):
        def forward(self, input_features: torch.Tensor) -> torch.Tensor:
            return self.result(input_features)

    kinds = {"input_ids": TokenIds, "pixel_values": PixelValues, "input_features": InputFeatures}
    return kinds[argument]().eval()


def fit_batchnorm(model: Any, images: np.ndarray, batch: int = BATCHNORM_FIT_BATCH) -> int:
    """Fit every BatchNorm's running statistics to ``images``: the cumulative average (momentum None) of batch
    statistics over the images in train mode (only the norms train: dropout stays off), then eval. The affine
    parameters restart at gamma = 1, beta = 0 (transformers draws gamma ~ N(0, 0.02) for some models, which
    leaves a deep random CNN's output about 1e-30 and constant). A frozen
    BatchNorm (buffers only, as in DETR's backbone) gets the same from a hook on its input. Returns the number of
    norms fitted."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    frozen = [
        m
        for m in model.modules()
        if not isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        and isinstance(getattr(m, "running_mean", None), torch.Tensor)
        and isinstance(getattr(m, "running_var", None), torch.Tensor)
    ]
    if not norms and not frozen:
        return 0
    model.eval()
    for norm in norms:
        norm.reset_parameters()  # also gamma = 1, beta = 0: some of transformers' inits draw gamma ~ N(0, 0.02)
        norm.momentum = None
        norm.train()
    sums: dict[int, list[torch.Tensor]] = {}

    def use_batch_statistics(module: Any, args: tuple[Any, ...]) -> None:
        x = args[0].detach().double()
        axes = [0, *range(2, x.dim())]
        mean, var = x.mean(dim=axes), x.var(dim=axes, unbiased=False)
        total = sums.setdefault(id(module), [torch.zeros_like(mean), torch.zeros_like(var), torch.zeros(())])
        total[0] += mean
        total[1] += x.var(dim=axes, unbiased=True)
        total[2] += 1
        module.running_mean.copy_(mean.to(module.running_mean.dtype))
        module.running_var.copy_(var.to(module.running_var.dtype))

    hooks = [m.register_forward_pre_hook(use_batch_statistics) for m in frozen]
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch):
                model(torch.from_numpy(images[start : start + batch]))
    finally:
        for hook in hooks:
            hook.remove()
    for module in frozen:
        mean, var, count = sums[id(module)]
        module.running_mean.copy_((mean / count).to(module.running_mean.dtype))
        module.running_var.copy_((var / count).to(module.running_var.dtype))
    model.eval()
    return len(norms) + len(frozen)


def _model(factory: Callable[[], Any], name: str) -> Any:
    import torch

    torch.manual_seed(_seed(name, "weights"))
    return factory().eval()


def _decoder(name: str, factory: Callable[[], Any], vocab: int, tokens: int) -> ZooCase:
    """A causal LM: token ids in, logits out, no KV cache."""
    import torch

    module = _output_module(_model(factory, name), "input_ids", "logits", use_cache=False)
    return _text_case(name, module, vocab, tokens, torch)


def _encoder(name: str, factory: Callable[[], Any], vocab: int, tokens: int) -> ZooCase:
    """A bidirectional text encoder: token ids in (no attention mask: every token attends), hidden states out."""
    import torch

    module = _output_module(_model(factory, name), "input_ids", "last_hidden_state")
    return _text_case(name, module, vocab, tokens, torch)


def _text_case(name: str, module: Any, vocab: int, tokens: int, torch: Any) -> ZooCase:
    example = _token_batches(name, "example", 1, vocab, tokens)[0]
    return ZooCase(
        name=name,
        module=module,
        example_inputs=(torch.from_numpy(example[0]),),
        calibration=_token_batches(name, "calibration", CALIBRATION_BATCHES, vocab, tokens),
        held_out=_token_batches(name, "held-out", HELD_OUT_BATCHES, vocab, tokens),
    )


def _vision(name: str, factory: Callable[[], Any], size: int, output: str = "last_hidden_state") -> ZooCase:
    """An image model: a normalised photo crop in, ``output`` out; BatchNorm fitted on other crops first."""
    import torch

    model = _model(factory, name)
    fitted = fit_batchnorm(model, photo_crops(BATCHNORM_FIT_CROPS, size, _seed(name, "batchnorm")))
    logger.info("%s: fitted %d BatchNorm layers on photo crops", name, fitted)
    module = _output_module(model, "pixel_values", output)
    example = _image_batches(name, "example", 1, size)[0]
    return ZooCase(
        name=name,
        module=module,
        example_inputs=(torch.from_numpy(example[0]),),
        calibration=_image_batches(name, "calibration", CALIBRATION_BATCHES, size),
        held_out=_image_batches(name, "held-out", HELD_OUT_BATCHES, size),
    )


# --- families -------------------------------------------------------------------------------------------------


def _transformers() -> Any:
    import transformers

    return transformers


def llama() -> ZooCase:
    t = _transformers()
    config = t.LlamaConfig(
        vocab_size=151, hidden_size=56, intermediate_size=104, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return _decoder("llama", lambda: t.LlamaForCausalLM(config), 151, 13)


def mistral() -> ZooCase:
    t = _transformers()
    config = t.MistralConfig(
        vocab_size=131, hidden_size=48, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, sliding_window=8,
    )  # fmt: skip
    return _decoder("mistral", lambda: t.MistralForCausalLM(config), 131, 15)


def qwen2() -> ZooCase:
    t = _transformers()
    config = t.Qwen2Config(
        vocab_size=173, hidden_size=60, intermediate_size=112, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    return _decoder("qwen2", lambda: t.Qwen2ForCausalLM(config), 173, 13)


def qwen3() -> ZooCase:
    t = _transformers()
    config = t.Qwen3Config(
        vocab_size=181, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    return _decoder("qwen3", lambda: t.Qwen3ForCausalLM(config), 181, 11)


def gemma() -> ZooCase:
    t = _transformers()
    config = t.GemmaConfig(
        vocab_size=199, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    return _decoder("gemma", lambda: t.GemmaForCausalLM(config), 199, 13)


def gpt2() -> ZooCase:
    t = _transformers()
    config = t.GPT2Config(vocab_size=97, n_embd=52, n_layer=2, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=2)
    return _decoder("gpt2", lambda: t.GPT2LMHeadModel(config), 97, 15)


def gpt_j() -> ZooCase:
    t = _transformers()
    config = t.GPTJConfig(
        vocab_size=113, n_embd=48, n_layer=2, n_head=3, rotary_dim=8, n_positions=32, bos_token_id=1, eos_token_id=2
    )
    return _decoder("gpt-j", lambda: t.GPTJForCausalLM(config), 113, 13)


def gpt_neo() -> ZooCase:
    t = _transformers()
    config = t.GPTNeoConfig(
        vocab_size=107, hidden_size=44, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=8, max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return _decoder("gpt-neo", lambda: t.GPTNeoForCausalLM(config), 107, 13)


def gpt_neox() -> ZooCase:
    t = _transformers()
    config = t.GPTNeoXConfig(
        vocab_size=127, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        rotary_pct=0.5, max_position_embeddings=64,
    )  # fmt: skip
    return _decoder("gpt-neox", lambda: t.GPTNeoXForCausalLM(config), 127, 17)


def opt() -> ZooCase:
    t = _transformers()
    config = t.OPTConfig(
        vocab_size=149, hidden_size=40, ffn_dim=88, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=40, max_position_embeddings=64,
    )  # fmt: skip
    return _decoder("opt", lambda: t.OPTForCausalLM(config), 149, 13)


def falcon() -> ZooCase:
    t = _transformers()
    config = t.FalconConfig(
        vocab_size=139, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
        parallel_attn=True, bias=False,
    )  # fmt: skip
    return _decoder("falcon", lambda: t.FalconForCausalLM(config), 139, 13)


def bloom() -> ZooCase:
    t = _transformers()
    config = t.BloomConfig(vocab_size=163, hidden_size=48, n_layer=2, n_head=4)
    return _decoder("bloom", lambda: t.BloomForCausalLM(config), 163, 11)


def mpt() -> ZooCase:
    t = _transformers()
    config = t.MptConfig(vocab_size=157, d_model=48, n_layers=2, n_heads=4, max_seq_len=32, expansion_ratio=2)
    return _decoder("mpt", lambda: t.MptForCausalLM(config), 157, 13)


def phi() -> ZooCase:
    t = _transformers()
    config = t.PhiConfig(
        vocab_size=191, hidden_size=48, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
        partial_rotary_factor=0.5, max_position_embeddings=64,
    )  # fmt: skip
    return _decoder("phi", lambda: t.PhiForCausalLM(config), 191, 13)


def phi3() -> ZooCase:
    t = _transformers()
    config = t.Phi3Config(
        vocab_size=197, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return _decoder("phi3", lambda: t.Phi3ForCausalLM(config), 197, 13)


def stablelm() -> ZooCase:
    t = _transformers()
    config = t.StableLmConfig(
        vocab_size=167, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, partial_rotary_factor=0.25, max_position_embeddings=64,
    )  # fmt: skip
    return _decoder("stablelm", lambda: t.StableLmForCausalLM(config), 167, 13)


def starcoder2() -> ZooCase:
    t = _transformers()
    config = t.Starcoder2Config(
        vocab_size=179, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=None, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return _decoder("starcoder2", lambda: t.Starcoder2ForCausalLM(config), 179, 13)


def bert() -> ZooCase:
    t = _transformers()
    config = t.BertConfig(
        vocab_size=109, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=92,
        max_position_embeddings=32,
    )  # fmt: skip
    return _encoder("bert", lambda: t.BertModel(config, add_pooling_layer=False), 109, 15)


def albert() -> ZooCase:
    t = _transformers()
    config = t.AlbertConfig(
        vocab_size=103, embedding_size=24, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=88, max_position_embeddings=32,
    )  # fmt: skip
    return _encoder("albert", lambda: t.AlbertModel(config, add_pooling_layer=False), 103, 15)


def electra() -> ZooCase:
    t = _transformers()
    config = t.ElectraConfig(
        vocab_size=113, embedding_size=32, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=84, max_position_embeddings=32,
    )  # fmt: skip
    return _encoder("electra", lambda: t.ElectraModel(config), 113, 15)


def roberta() -> ZooCase:
    t = _transformers()
    config = t.RobertaConfig(
        vocab_size=127, hidden_size=52, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=40, pad_token_id=1,
    )  # fmt: skip
    return _encoder("roberta", lambda: t.RobertaModel(config, add_pooling_layer=False), 127, 13)


def distilbert() -> ZooCase:
    t = _transformers()
    config = t.DistilBertConfig(
        vocab_size=131, dim=48, n_layers=2, n_heads=4, hidden_dim=88, max_position_embeddings=32
    )
    return _encoder("distilbert", lambda: t.DistilBertModel(config), 131, 15)


def mpnet() -> ZooCase:
    t = _transformers()
    config = t.MPNetConfig(
        vocab_size=137, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=92,
        max_position_embeddings=40,
    )  # fmt: skip
    return _encoder("mpnet", lambda: t.MPNetModel(config, add_pooling_layer=False), 137, 13)


def t5_encoder() -> ZooCase:
    t = _transformers()
    config = t.T5Config(
        vocab_size=149, d_model=48, d_kv=12, d_ff=88, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
    )  # fmt: skip
    return _encoder("t5-encoder", lambda: t.T5EncoderModel(config), 149, 15)


def whisper_encoder() -> ZooCase:
    import torch

    t = _transformers()
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    mel_bins, positions = 24, 15
    config = t.WhisperConfig(
        vocab_size=101, num_mel_bins=mel_bins, d_model=48, encoder_layers=2, encoder_attention_heads=4,
        encoder_ffn_dim=88, max_source_positions=positions, decoder_layers=1, decoder_attention_heads=4,
        decoder_ffn_dim=88, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )  # fmt: skip
    name, frames = "whisper-encoder", 2 * positions  # the encoder requires exactly 2 x max_source_positions frames
    encoder = _model(lambda: WhisperEncoder(config), name)
    with torch.no_grad():  # transformers' 0.02 init leaves the features far below the sinusoidal positions
        for conv in (encoder.conv1, encoder.conv2):
            torch.nn.init.kaiming_normal_(conv.weight)
    module = _output_module(encoder, "input_features", "last_hidden_state")
    example = _feature_batches(name, "example", 1, mel_bins, frames)[0]
    return ZooCase(
        name=name,
        module=module,
        example_inputs=(torch.from_numpy(example[0]),),
        calibration=_feature_batches(name, "calibration", CALIBRATION_BATCHES, mel_bins, frames),
        held_out=_feature_batches(name, "held-out", HELD_OUT_BATCHES, mel_bins, frames),
    )


def vit() -> ZooCase:
    t = _transformers()
    config = t.ViTConfig(
        image_size=40, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=92
    )
    return _vision("vit", lambda: t.ViTModel(config, add_pooling_layer=False), 40)


def deit() -> ZooCase:
    t = _transformers()
    config = t.DeiTConfig(
        image_size=48, patch_size=8, hidden_size=44, num_hidden_layers=2, num_attention_heads=4, intermediate_size=88
    )
    return _vision("deit", lambda: t.DeiTModel(config, add_pooling_layer=False), 48)


def beit() -> ZooCase:
    t = _transformers()
    config = t.BeitConfig(
        image_size=40, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        use_relative_position_bias=True, layer_scale_init_value=0.1,
    )  # fmt: skip
    return _vision("beit", lambda: t.BeitModel(config, add_pooling_layer=False), 40)


def dinov2() -> ZooCase:
    t = _transformers()
    config = t.Dinov2Config(
        image_size=42, patch_size=7, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=2
    )
    return _vision("dinov2", lambda: t.Dinov2Model(config), 42)


def clip_vision() -> ZooCase:
    t = _transformers()
    config = t.CLIPVisionConfig(
        image_size=40, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=88
    )
    return _vision("clip-vision", lambda: t.CLIPVisionModel(config), 40)


def swin() -> ZooCase:
    t = _transformers()
    config = t.SwinConfig(
        image_size=48, patch_size=4, embed_dim=24, depths=[1, 1], num_heads=[2, 4], window_size=3, mlp_ratio=2.0,
        drop_path_rate=0.0,
    )  # fmt: skip
    return _vision("swin", lambda: t.SwinModel(config, add_pooling_layer=False), 48)


def convnext() -> ZooCase:
    t = _transformers()
    config = t.ConvNextConfig(patch_size=4, hidden_sizes=[24, 48], depths=[1, 1], num_stages=2, drop_path_rate=0.0)
    return _vision("convnext", lambda: t.ConvNextModel(config), 48)


def convnextv2() -> ZooCase:
    t = _transformers()
    config = t.ConvNextV2Config(patch_size=4, hidden_sizes=[20, 40], depths=[1, 1], num_stages=2, drop_path_rate=0.0)
    return _vision("convnextv2", lambda: t.ConvNextV2Model(config), 40)


def resnet() -> ZooCase:
    t = _transformers()
    config = t.ResNetConfig(embedding_size=24, hidden_sizes=[24, 48], depths=[1, 1], layer_type="basic")
    return _vision("resnet", lambda: t.ResNetModel(config), 56)


def regnet() -> ZooCase:
    t = _transformers()
    config = t.RegNetConfig(embedding_size=16, hidden_sizes=[24, 48], depths=[1, 1], groups_width=8, layer_type="y")
    return _vision("regnet", lambda: t.RegNetModel(config), 48)


def mobilenet_v1() -> ZooCase:
    t = _transformers()
    config = t.MobileNetV1Config(image_size=48, depth_multiplier=0.25, min_depth=8)
    return _vision("mobilenet-v1", lambda: t.MobileNetV1Model(config, add_pooling_layer=False), 48)


def mobilenet_v2() -> ZooCase:
    t = _transformers()
    config = t.MobileNetV2Config(image_size=64, depth_multiplier=0.35, min_depth=8, finegrained_output=False)
    return _vision("mobilenet-v2", lambda: t.MobileNetV2Model(config, add_pooling_layer=False), 64)


def mobilevit() -> ZooCase:
    t = _transformers()
    config = t.MobileViTConfig(
        image_size=64, hidden_sizes=[40, 48, 56], neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 96], num_attention_heads=4,
        expand_ratio=2.0,
    )  # fmt: skip
    return _vision("mobilevit", lambda: t.MobileViTModel(config), 64)


def efficientnet() -> ZooCase:
    t = _transformers()
    config = t.EfficientNetConfig(
        image_size=64, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, drop_connect_rate=0.0
    )  # hidden_dim: the top conv's width, round_filters(1280) at this width
    return _vision("efficientnet", lambda: t.EfficientNetModel(config), 64)


def levit() -> ZooCase:
    t = _transformers()
    config = t.LevitConfig(
        image_size=96, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4], depths=[1, 1, 1],
        key_dim=[16, 16, 16], drop_path_rate=0,
    )  # fmt: skip
    return _vision("levit", lambda: t.LevitModel(config), 96)


def poolformer() -> ZooCase:
    t = _transformers()
    config = t.PoolFormerConfig(
        hidden_sizes=[16, 32], depths=[1, 1], num_encoder_blocks=2, patch_sizes=[7, 3], strides=[4, 2],
        padding=[2, 1], drop_path_rate=0.0,
    )  # fmt: skip
    return _vision("poolformer", lambda: t.PoolFormerModel(config), 48)


def segformer() -> ZooCase:
    t = _transformers()
    config = t.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[4, 2], hidden_sizes=[16, 40], patch_sizes=[7, 3],
        strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=7,
        drop_path_rate=0.0,
    )  # fmt: skip
    return _vision("segformer", lambda: t.SegformerForSemanticSegmentation(config), 48, output="logits")


def detr() -> ZooCase:
    t = _transformers()
    backbone = t.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", out_features=["stage2"]
    )
    config = t.DetrConfig(
        backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, d_model=32,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, num_queries=11,
    )  # fmt: skip
    return _vision("detr", lambda: t.DetrModel(config), 64)


FAMILIES: dict[str, Callable[[], ZooCase]] = {
    # causal decoders
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "gemma": gemma,
    "gpt2": gpt2,
    "gpt-j": gpt_j,
    "gpt-neo": gpt_neo,
    "gpt-neox": gpt_neox,
    "opt": opt,
    "falcon": falcon,
    "bloom": bloom,
    "mpt": mpt,
    "phi": phi,
    "phi3": phi3,
    "stablelm": stablelm,
    "starcoder2": starcoder2,
    # text and audio encoders
    "bert": bert,
    "albert": albert,
    "electra": electra,
    "roberta": roberta,
    "distilbert": distilbert,
    "mpnet": mpnet,
    "t5-encoder": t5_encoder,
    "whisper-encoder": whisper_encoder,
    # vision transformers
    "vit": vit,
    "deit": deit,
    "beit": beit,
    "dinov2": dinov2,
    "clip-vision": clip_vision,
    "swin": swin,
    "levit": levit,
    "segformer": segformer,
    "detr": detr,
    # CNNs
    "convnext": convnext,
    "convnextv2": convnextv2,
    "resnet": resnet,
    "regnet": regnet,
    "mobilenet-v1": mobilenet_v1,
    "mobilenet-v2": mobilenet_v2,
    "mobilevit": mobilevit,
    "efficientnet": efficientnet,
    "poolformer": poolformer,
}

#: the causal decoders of :data:`FAMILIES` (token ids in, logits out): the families a KV cache must serve
DECODERS: tuple[str, ...] = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2", "gpt-j", "gpt-neo", "gpt-neox", "opt", "falcon", "bloom",
    "mpt", "phi", "phi3", "stablelm", "starcoder2",
)  # fmt: skip


def decoder(name: str) -> tuple[Any, list[np.ndarray], list[np.ndarray]]:
    """The transformers causal LM of decoder family ``name``, its calibration and held-out token ids ``[1, T]``."""
    if name not in DECODERS:
        raise ValueError(f"{name!r} is not a decoder family; choose one of {DECODERS}")
    case = FAMILIES[name]()
    return case.module.model, [b[0] for b in case.calibration], [b[0] for b in case.held_out]


# --- evaluation -----------------------------------------------------------------------------------------------


def float_noise_cosine(case: ZooCase, noise_db: float = NOISE_DB) -> float | None:
    """The float model's centred cosine between its outputs on the held-out inputs and on the same inputs with
    Gaussian noise at ``noise_db`` below their RMS (a fixed seed); None for integer (token) inputs."""
    import torch

    if not all(np.asarray(a).dtype.kind == "f" for batch in case.held_out for a in batch):
        return None
    rng = np.random.default_rng(_seed(case.name, "noise"))
    cosines = []
    with torch.no_grad():
        for batch in case.held_out:
            clean = case.module(*(torch.from_numpy(a) for a in batch)).numpy()
            noisy_inputs = []
            for a in batch:
                rms = float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))
                noise = rng.standard_normal(a.shape) * rms * 10 ** (-noise_db / 20)
                noisy_inputs.append(torch.from_numpy((a + noise).astype(a.dtype)))
            cosines.append(centred_cosine(case.module(*noisy_inputs).numpy(), clean))
    return float(np.mean(cosines))


def centred_cosine(got: np.ndarray, want: np.ndarray) -> float:
    """cos(got - mean(got), want - mean(want)), both flattened."""
    a = np.asarray(got, np.float64).ravel()
    b = np.asarray(want, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denominator) if denominator > 0 else float("nan")


def _source_roots() -> list[Path]:
    import qcompiler
    import qcompiler.backends
    import qcompiler.passes

    return [Path(str(m.__file__)).resolve().parent for m in (qcompiler, qcompiler.passes, qcompiler.backends)]


def compiler_site(exc: BaseException) -> str | None:
    """``file:line`` of the innermost compiler frame (qcompiler, its passes and backends; not this module) in the
    chain of ``exc`` and the exceptions it was raised from, relative to the repository."""
    roots = _source_roots()
    repository = roots[0].parent
    here = Path(__file__).resolve()
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for error in reversed(chain):  # the innermost exception first
        for frame in reversed(traceback.extract_tb(error.__traceback__)):
            path = Path(frame.filename).resolve()
            if path != here and any(path.is_relative_to(root) for root in roots):
                shown = path.relative_to(repository) if path.is_relative_to(repository) else path
                return f"{shown}:{frame.lineno}"
    return None


def _failure(name: str, stage: str, exc: BaseException, seconds: dict[str, float], **known: Any) -> ZooResult:
    from qcompiler.errors import ModelLoadError, PassFailedError, UnsupportedOpError

    refused = isinstance(exc, UnsupportedOpError | ModelLoadError) and stage in ("compile", "simulate")
    return ZooResult(
        family=name,
        outcome="refused" if refused else "internal-error",
        error_type=type(exc).__name__,
        error_site=compiler_site(exc),
        failed_pass=exc.pass_name if isinstance(exc, PassFailedError) else None,
        stage=stage,
        detail=str(exc),
        seconds=seconds,
        **known,
    )


def _copy(model: Any) -> Any:
    import onnx_ir as ir

    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def evaluate_family(name: str, recipe: str | None = None, lowering_batches: int = LOWERING_BATCHES) -> ZooResult:
    """Build family ``name``, compile it (``recipe``, or :func:`qcompiler.compile`'s default), run it on the
    held-out batches and classify the outcome (module docstring). Never raises for a compiler failure: the
    result records it.

    The module is captured once with :func:`qcompiler.ir.load` (what ``compile`` does first) and ``compile`` and
    ``simulate`` each get a copy of that graph, so that their values share names for the op-by-op check.
    """
    import qcompiler
    from qcompiler.passes.lower import float_ops_inside
    from qcompiler.testing.lowering import assert_lowering_matches

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    try:
        case = FAMILIES[name]()
    except KeyError:
        raise
    except Exception as exc:  # a family that transformers cannot build here is the zoo's fault, not the compiler's
        return _failure(name, "build", exc, seconds)
    seconds["build"] = time.perf_counter() - start
    chosen = recipe if recipe is not None else inspect.signature(qcompiler.compile).parameters["recipe"].default
    options: dict[str, Any] = {} if recipe is None else {"recipe": recipe}

    start = time.perf_counter()
    try:
        captured = qcompiler.ir.load(case.module, case.example_inputs)
        seconds["export"] = time.perf_counter() - start
        compiled = qcompiler.compile(
            _copy(captured), "llvm", example_inputs=case.example_inputs, calibration=case.calibration,
            progress=False, **options,
        )  # fmt: skip
    except Exception as exc:
        seconds["compile"] = time.perf_counter() - start
        return _failure(name, "compile", exc, seconds)
    compile_seconds = time.perf_counter() - start
    seconds["compile"] = compile_seconds

    import onnx_ir as ir
    import torch

    start = time.perf_counter()
    try:
        cosines = []
        for batch in case.held_out:
            with torch.no_grad():
                want = case.module(*(torch.from_numpy(a) for a in batch)).numpy()
            got = np.asarray(compiled(*batch))
            cosines.append(centred_cosine(got, want))
        cosine = float(np.mean(cosines))
        float_ops = tuple(float_ops_inside(ir.serde.deserialize_model(compiled.integer_model)))
    except Exception as exc:
        return _failure(name, "run", exc, seconds, compile_seconds=compile_seconds)
    seconds["run"] = time.perf_counter() - start
    known: dict[str, Any] = {"compile_seconds": compile_seconds, "cosine": cosine, "float_ops": float_ops}

    start = time.perf_counter()
    try:
        simulation = qcompiler.simulate(
            _copy(captured), calibration=case.calibration, recipe=chosen, example_inputs=case.example_inputs,
            progress=False, nonlinearities="integer",
        )  # fmt: skip
    except Exception as exc:
        return _failure(name, "simulate", exc, seconds, **known)
    seconds["simulate"] = time.perf_counter() - start

    start = time.perf_counter()
    feeds = [dict(zip(compiled.input_names, batch, strict=True)) for batch in case.held_out[:lowering_batches]]
    mismatch = ""
    try:
        known["compared_ops"] = len(assert_lowering_matches(simulation, compiled.integer_model, feeds))
    except AssertionError as exc:
        mismatch = str(exc)
    except Exception as exc:
        return _failure(name, "compare", exc, seconds, **known)
    seconds["compare"] = time.perf_counter() - start

    if float_ops:
        return ZooResult(
            family=name, outcome="internal-error", stage="compile", lowering_matches=not mismatch, seconds=seconds,
            detail=f"float ops in the integer graph: {list(float_ops)[:5]}", **known,
        )  # fmt: skip
    problems = []
    noise_cosine = float_noise_cosine(case)
    known["noise_cosine"] = noise_cosine
    ill_conditioned = noise_cosine is not None and noise_cosine < COSINE_FLOOR
    if not cosine >= COSINE_FLOOR and ill_conditioned and not mismatch:
        return ZooResult(
            family=name, outcome="ill-conditioned", lowering_matches=True, seconds=seconds,
            detail=f"the float model itself: centred cosine {noise_cosine:.4f} under {NOISE_DB:.0f} dB input noise",
            **known,
        )  # fmt: skip
    if not cosine >= COSINE_FLOOR:
        problems.append(f"centred cosine {cosine:.4f} < {COSINE_FLOOR}")
    if mismatch:
        problems.append(mismatch)
    return ZooResult(
        family=name,
        outcome="low-accuracy" if problems else "ok",
        lowering_matches=not mismatch,
        stage=None if not problems else "compare",
        detail="; ".join(problems),
        seconds=seconds,
        **known,
    )


def family_names(selection: str | Sequence[str] | None = None) -> list[str]:
    """The families named (comma-separated or a list), checked against :data:`FAMILIES`; all when ``None``."""
    if selection is None:
        return list(FAMILIES)
    names = [n.strip() for n in selection.split(",")] if isinstance(selection, str) else list(selection)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"families: unknown {unknown}; choose from {sorted(FAMILIES)}")
    return names
