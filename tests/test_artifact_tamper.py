"""Tampered and damaged artifacts: every case is one ArtifactError naming the problem, never a traceback, a
segfault or silently wrong scores. Most tampering is caught by the content hash; re-signing the hash (as an
attacker who edits model.json too would) must still be caught by the structural checks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from recforge.data import Interactions
from recforge.errors import ArtifactError, DataError, DeviceError, ParameterError
from recforge.models import Recommender, create_model
from recforge.models.artifact import file_hashes

_SEQ = {"max_len": 20, "n_factors": 16, "epochs": 1, "batch_size": 64, "num_threads": 1, "progress": False}


@pytest.fixture(scope="module")
def saved(planted: Interactions, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tamper")
    models = {
        "ease": create_model("ease", reg=50.0),
        "als": create_model("als", n_factors=8, epochs=2, num_threads=1),
        "sasrec": create_model("sasrec", **_SEQ),
        "scoreblend": create_model("scoreblend", models=["pop", "ease"]),
        "content": create_model("content"),
        "two_tower": create_model("twotower", epochs=1, n_factors=8, num_threads=1, progress=False),
    }
    out = {}
    for name, model in models.items():
        data = planted if name != "content" else _with_text(planted)
        out[name] = model.fit(data).save(root / name)
    return out


def _with_text(planted: Interactions) -> Interactions:
    import pandas as pd

    items = pd.DataFrame({"item_id": planted.item_map.ids, "title": [f"item {i % 17} kind {i % 5}" for i in
                                                                     range(planted.n_items)]})
    return Interactions.from_frame(planted.to_frame(), item_data=items)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _edit_arrays(path: Path, edit: Callable[[dict[str, np.ndarray]], None], resign: bool) -> None:
    arrays = load_file(str(path / "arrays.safetensors"))
    edit(arrays)
    save_file(arrays, str(path / "arrays.safetensors"))
    if resign:
        _resign(path)


def _edit_meta(path: Path, edit: Callable[[dict], object]) -> None:
    meta = json.loads((path / "model.json").read_text())
    new = edit(meta)
    (path / "model.json").write_text(json.dumps(meta if new is None else new))


def _resign(path: Path) -> None:
    meta = json.loads((path / "model.json").read_text())
    meta["sha256"] = file_hashes(path)
    (path / "model.json").write_text(json.dumps(meta))


def _shift_seen(a: dict) -> None:
    a["seen.indices"] = a["seen.indices"] + 10**6


def _cut_w(a: dict) -> None:
    a["W"] = np.ascontiguousarray(a["W"][:100, :100])


def _truncate_indptr(a: dict) -> None:
    a["seen.indptr"] = a["seen.indptr"][:-5]


def _nan_factors(a: dict) -> None:
    a["user_factors"][3, 1] = np.nan


def _bad_tokens(a: dict) -> None:
    a["history.tokens"][0] = 10**6


def _bad_neighbors(a: dict) -> None:
    a["neighbors"][0, 0] = 10**6


def _decreasing_offsets(a: dict) -> None:
    a["history.offsets"][5] = a["history.offsets"][4] - 1


def _first_weight(a: dict) -> str:
    return next(k for k in sorted(a) if k.startswith("net.") and a[k].dtype.kind == "f" and a[k].ndim == 2)


def _minus_inf_weight(a: dict) -> None:
    a[_first_weight(a)][0, 0] = -np.inf


def _int_weights(a: dict) -> None:
    key = _first_weight(a)
    a[key] = np.ascontiguousarray(a[key] * 10).astype(np.int32)


def _negative_counts(a: dict) -> None:
    a["item_counts"][3] = -4


def _int_vectors(a: dict) -> None:
    a["user_vectors"] = np.ascontiguousarray(a["user_vectors"] * 10).astype(np.int32)


def _minus_inf_vectors(a: dict) -> None:
    a["user_vectors"][2] = -np.inf


def _beyond_float32(a: dict) -> None:
    a["user_vectors"] = a["user_vectors"].astype(np.float64) * 1e300


def _overflowing_vectors(a: dict) -> None:  # finite, but their products are not
    a["user_vectors"][:] = 1e38
    a["item_vectors"][:] = 1e38


def _overflowing_weights(a: dict) -> None:
    for key in [k for k in a if k.startswith("net.") and "emb" in k]:
        a[key] = np.ascontiguousarray(a[key] * 1e36)


def _moved_id_rows(a: dict) -> None:
    a["net.item.id_rows"][0] = 10**6


@pytest.mark.parametrize(
    ("model", "edit", "message"),
    [
        ("sasrec", _minus_inf_weight, "holds NaN or infinite values"),
        ("sasrec", _int_weights, "is torch.int32; this model's is torch.float32"),
        ("sasrec", _negative_counts, "item_counts must hold a count"),
        ("two_tower", _int_vectors, "user_vectors must hold floats"),
        ("two_tower", _minus_inf_vectors, "user_vectors must hold finite float32"),
        ("two_tower", _beyond_float32, "user_vectors must hold finite float32"),
        ("two_tower", _overflowing_vectors, "score NaN or \\+inf"),
        ("sasrec", _overflowing_weights, "score NaN or \\+inf"),
        ("two_tower", _moved_id_rows, "id_rows does not follow"),
        ("ease", _shift_seen, "seen column indices fall outside"),
        ("ease", _cut_w, "W has shape"),
        ("ease", _truncate_indptr, "seen row pointers"),
        ("als", _nan_factors, "user_factors holds NaN"),
        ("sasrec", _bad_tokens, "history.tokens holds tokens outside"),
        ("sasrec", _decreasing_offsets, "history.offsets must"),
        ("content", _bad_neighbors, "neighbors holds indices outside"),
    ],
)
def test_tampered_arrays_are_refused(saved: dict[str, Path], tmp_path: Path, model: str, edit: Callable,
                                     message: str) -> None:
    unsigned = _copy(saved[model], tmp_path / "unsigned")
    _edit_arrays(unsigned, edit, resign=False)
    with pytest.raises(ArtifactError, match="does not match the SHA-256"):
        Recommender.load(unsigned)
    signed = _copy(saved[model], tmp_path / "signed")
    _edit_arrays(signed, edit, resign=True)
    with pytest.raises(ArtifactError, match=message):
        Recommender.load(signed)


def _drop_model(meta: dict) -> None:
    del meta["model"]


def _extra_param(meta: dict) -> None:
    meta["params"]["bogus"] = 1


def _null_params(meta: dict) -> None:
    meta["params"] = None


def _bad_param(meta: dict) -> None:
    meta["params"]["reg"] = -5


def _bad_member(meta: dict) -> None:
    meta["scalars"]["members"] = json.dumps([{"name": "pop", "params": {"by": "nonsense"}},
                                             {"name": "ease", "params": {}}])


def _string_count(meta: dict) -> None:
    meta["n_users"] = "300"


@pytest.mark.parametrize(
    ("model", "edit", "message"),
    [
        ("ease", _drop_model, "lacks 'model'"),
        ("ease", _extra_param, "bogus"),
        ("ease", _null_params, "'params' must be dict"),
        ("ease", _bad_param, "refuses"),
        ("ease", lambda meta: [meta], "format"),
        ("ease", _string_count, "'n_users' must be int"),
        ("scoreblend", _bad_member, "member 0"),
        ("sasrec", lambda meta: meta["params"].update(device="tpu"), "device.*'cuda:N'"),
        ("sasrec", lambda meta: meta["scalars"].update(net_items=10**12), "net_items is 1000000000000"),
        ("sasrec", lambda meta: meta["scalars"].update(net_items=meta["n_items"] + 5), "net_items is"),
        ("sasrec", lambda meta: meta["scalars"].update(net_items="5"), "net_items is '5'"),
        ("two_tower", lambda meta: meta["scalars"].update({"prep.time_std": "x"}), "prep.time_std is 'x'"),
        ("two_tower", lambda meta: meta["scalars"].update({"prep.time_std": 0}), "prep.time_std is 0"),
        ("als", lambda meta: meta["params"].update(device="cuda:x" * 2_000), "device.*'cuda:N'"),
    ],
)
def test_tampered_model_json_is_refused(saved: dict[str, Path], tmp_path: Path, model: str, edit: Callable,
                                        message: str) -> None:
    path = _copy(saved[model], tmp_path)
    _edit_meta(path, edit)
    with pytest.raises(ArtifactError, match=message):
        Recommender.load(path)


def test_an_artifact_cannot_aim_a_fit_at_a_folder_and_loads_without_the_gpu_it_names(
        saved: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the saving machine wrote its checkpoints is not followed (a refit would write, and replace, there);
    a network saved for ``device="cuda"`` loads on a machine without one, with a warning."""
    path = _copy(saved["sasrec"], tmp_path)
    victim = tmp_path / "victim"
    _edit_meta(path, lambda meta: meta["params"].update(checkpoint_dir=str(victim), resume=True, device="cuda"))
    with caplog.at_level("WARNING"):
        model = Recommender.load(path)
    assert model.checkpoint_dir is None and model.resume is False
    if not torch.cuda.is_available():
        assert model.device_.type == "cpu" and "no CUDA GPU" in caplog.text
    assert not victim.exists()
    if not torch.cuda.is_available():  # this machine's setting is named as such, not blamed on the artifact
        monkeypatch.setenv("RECFORGE_DEVICE", "cuda")
        with pytest.raises(DeviceError, match="^RECFORGE_DEVICE='cuda' was asked for"):
            Recommender.load(path)


def test_another_models_arrays_or_fewer_ids_are_refused(saved: dict[str, Path], tmp_path: Path) -> None:
    mixed = _copy(saved["ease"], tmp_path / "mixed")
    shutil.copy(saved["als"] / "arrays.safetensors", mixed / "arrays.safetensors")
    _resign(mixed)
    with pytest.raises(ArtifactError, match="state lacks 'X.indptr'"):
        Recommender.load(mixed)
    fewer = _copy(saved["ease"], tmp_path / "fewer")
    with np.load(fewer / "ids.npz") as ids:
        users, items = ids["users"][:-3], ids["items"]
    np.savez(fewer / "ids.npz", users=users, items=items)
    _resign(fewer)
    with pytest.raises(ArtifactError, match="user ids; model.json says"):
        Recommender.load(fewer)


def _edit_ids(path: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    with np.load(path / "ids.npz") as ids:
        files = {k: ids[k] for k in ids.files}
    edit(files)
    np.savez(path / "ids.npz", **files)
    _resign(path)


def _bad_utf8(files: dict[str, np.ndarray]) -> None:
    files["item_titles.utf8"] = files["item_titles.utf8"].copy()
    files["item_titles.utf8"][0] = 0xFF


def _offsets_past_the_end(files: dict[str, np.ndarray]) -> None:
    files["item_titles.offsets"] = files["item_titles.offsets"] + 1


def _offsets_backwards(files: dict[str, np.ndarray]) -> None:
    offsets = files["item_titles.offsets"].copy()
    offsets[1], offsets[2] = offsets[2], offsets[1]
    files["item_titles.offsets"] = offsets


@pytest.mark.parametrize("edit, message", [(_bad_utf8, "not valid UTF-8"), (_offsets_past_the_end, "offsets"),
                                           (_offsets_backwards, "offsets"),
                                           (lambda f: f.pop("item_titles.offsets"), "packed strings")])
def test_tampered_packed_titles_are_refused(saved: dict[str, Path], tmp_path: Path, edit: Callable,
                                            message: str) -> None:
    path = _copy(saved["content"], tmp_path)
    _edit_ids(path, edit)
    with pytest.raises(ArtifactError, match=message):
        Recommender.load(path)


def test_titles_are_stored_compactly_and_older_fixed_width_titles_still_load(saved: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    model = Recommender.load(saved["content"])
    with np.load(saved["content"] / "ids.npz") as ids:
        assert "item_titles" not in ids.files and ids["item_titles.utf8"].dtype == np.uint8
    older = _copy(saved["content"], tmp_path)
    titles = model.item_titles_.astype("<U200")  # how artifacts before packing stored them: 800 bytes each

    def fixed_width(files: dict[str, np.ndarray]) -> None:
        del files["item_titles.utf8"], files["item_titles.offsets"]
        files["item_titles"] = titles

    _edit_ids(older, fixed_width)
    assert list(Recommender.load(older).item_titles_) == list(model.item_titles_)


def test_untampered_artifacts_load_and_score_the_same(saved: dict[str, Path], planted: Interactions) -> None:
    for path in saved.values():
        model = Recommender.load(path)
        again = Recommender.load(path)
        users = planted.user_map.ids[:5]
        assert model.recommend(users, k=5).equals(again.recommend(users, k=5))


def test_cli_answers_a_tampered_artifact_in_one_line(saved: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(saved["ease"], tmp_path)
    _edit_arrays(path, _shift_seen, resign=True)
    out = subprocess.run([sys.executable, "-m", "recforge", "recommend", str(path), "--user", "1"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2 and "seen column indices fall outside" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_version_1_artifacts_without_a_hash_still_load(saved: dict[str, Path], tmp_path: Path, caplog) -> None:
    path = _copy(saved["ease"], tmp_path)
    _edit_meta(path, lambda meta: {**{k: v for k, v in meta.items() if k != "sha256"}, "format_version": 1})
    with caplog.at_level("WARNING"):
        Recommender.load(path)
    assert "no content hash" in caplog.text
    _edit_arrays(path, _shift_seen, resign=False)  # without a hash the structural checks still hold
    with pytest.raises(ArtifactError, match="seen column indices"):
        Recommender.load(path)


def test_save_refuses_diverged_values_and_a_folder_over_its_checkpoints(planted: Interactions, tmp_path: Path) -> None:
    """What loading would refuse is never written; nor is a model saved where its fit keeps its checkpoints (the
    save would replace them, or they the model)."""
    model = create_model("pooling", **{**_SEQ, "checkpoint_dir": str(tmp_path / "ck")}).fit(planted)
    for path in (tmp_path / "ck", tmp_path / "ck" / "last", tmp_path):
        with pytest.raises(ParameterError, match="would replace the training checkpoints"):
            model.save(path)
    model.save(tmp_path / "elsewhere")
    als = create_model("als", n_factors=4, epochs=1, num_threads=1).fit(planted)
    als.user_factors_[0, 0] = np.nan
    with pytest.raises(DataError, match="user_factors holds NaN or \\+inf: the fit diverged"):
        als.save(tmp_path / "als")
