"""Real data that works offline, for tests, examples and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

MNIST_DIR = Path(__file__).resolve().parent / "assets" / "mnist-conv"  # ONNX model zoo mnist-8: see its README


def digits_28x28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 real 8x8 digits as MNIST-style inputs: ([n, 1, 28, 28] float32 in [0, 255], labels).

    Each digit is upscaled to 20x20 (bilinear, as torch's ``interpolate``, align_corners=False) and centred
    on a 28x28 canvas, the way MNIST digits sit; intensities 0..16 map to 0..255. The ONNX model zoo's
    MNIST CNN scores 88.9 % on them.
    """
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:, None].astype(np.float32))
    up = torch.nn.functional.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False).numpy()
    canvas = np.zeros((len(up), 1, 28, 28), dtype=np.float32)
    canvas[:, :, 4:24, 4:24] = np.clip(up, 0.0, 16.0) * (255.0 / 16.0)
    return canvas, digits.target.astype(np.int64)


def mnist_model_path() -> Path:
    """The trained ONNX model zoo MNIST CNN (shipped with the package; see assets/mnist-conv/README.md)."""
    return MNIST_DIR / "model.onnx"


def mnist_test_vector() -> tuple[np.ndarray, np.ndarray]:
    """The shipped input and expected output of the MNIST CNN."""
    folder = MNIST_DIR / "test_data_set_0"
    x = onnx.numpy_helper.to_array(onnx.load_tensor(str(folder / "input_0.pb")))
    y = onnx.numpy_helper.to_array(onnx.load_tensor(str(folder / "output_0.pb")))
    return x, y


#: WikiText-2's test split (CC BY-SA 3.0), shipped with the package (assets/wikitext-2/README.md)
WIKITEXT_TEST = Path(__file__).resolve().parent / "assets" / "wikitext-2" / "test.txt"


def wikitext_sentences(min_chars: int = 40) -> list[str]:
    """Real sentences: the lines of WikiText-2's test split longer than ``min_chars``, headings left out.

    Raises:
        FileNotFoundError: the package's copy of WikiText-2 is missing (a broken install).
    """
    if not WIKITEXT_TEST.is_file():
        raise FileNotFoundError(
            f"WikiText-2 not found at {WIKITEXT_TEST}: reinstall qcompiler (the file ships in qcompiler.testing)"
        )
    lines = (line.strip() for line in WIKITEXT_TEST.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if len(line) > min_chars and not line.startswith("=")]
