"""``qcompiler compile-lm`` and ``qcompiler generate`` end to end, on a transformers model directory written here
(a small random Llama and a word-level tokenizer: no hub, no download), against the Python API's generation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("transformers", reason="pip install -e '.[models]'")

from qcompiler.cli import main
from qcompiler.generation import CausalLM

pytestmark = pytest.mark.tvm

WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "was",
    "it",
    "for",
    "on",
    "as",
    "with",
    "by",
    "at",
    "from",
    "that",
    "this",
    "be",
    "are",
    "or",
    "an",
]
TEXT = " ".join(WORDS[(i * 7 + i // 3) % len(WORDS)] for i in range(900))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    (folder / "calibration.txt").write_text(TEXT)
    return str(folder)


def test_compile_lm_then_generate_streams_the_api_s_greedy_text(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "lm"
    calibration = f"{model_dir}/calibration.txt"
    args = ["compile-lm", model_dir, "--calibration", calibration, "--window", "64", "--windows", "4",
            "--max-context", "64", "--chunk", "16", "-o", str(out), "-q"]  # fmt: skip
    assert main(args) == 0
    assert "KV cache" in capsys.readouterr().out
    prompt = "the cat of the"
    assert main(["generate", str(out), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip()
    compiled = CausalLM.load(out)
    tokenizer = compiled.tokenizer
    ids = np.asarray(tokenizer(prompt)["input_ids"])
    tokens = [t for t in compiled.stream(ids, 6, stop=1) if t != 1]
    assert printed == prompt + tokenizer.decode(tokens, skip_special_tokens=True)
    assert len(printed) > len(prompt)

    # the command in a process of its own loads TVM's runtime alone (no compiler library, no torch) and says the
    # same; the probe after it shows the process really was runtime-only
    probe = ("import sys, tvm.base; "
             "print('runtime-only' if tvm.base._RUNTIME_ONLY and sys.modules['torch'] is None else 'all')")  # fmt: skip
    script = (f"import sys; sys.argv = ['qcompiler', 'generate', {str(out)!r}, '--prompt', {prompt!r}, "
              f"'--max-new-tokens', '6']\nfrom qcompiler.cli import entry\ntry:\n    entry()\nexcept SystemExit:\n"
              f"    pass\n{probe}")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert run.stdout.splitlines() == [printed, "runtime-only"]


def test_generate_and_compile_lm_refuse_bad_arguments(model_dir, tmp_path, capsys) -> None:
    assert main(["compile-lm", model_dir, "--calibration", str(tmp_path / "none.txt"), "-o", str(tmp_path / "o")]) == 2
    assert "--calibration" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert main(["compile-lm", str(tmp_path), "--calibration", str(text), "-o", str(tmp_path / "o")]) == 2
    assert "not a transformers causal LM directory" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 1
    assert "not a saved causal LM" in capsys.readouterr().err
