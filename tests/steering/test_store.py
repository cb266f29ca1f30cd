"""Storage: safetensors with metadata and llama.cpp control vectors, checked by reading the
files back with the gguf package's reader and by steering with the reloaded vectors."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from lmscope.core.errors import LmscopeError
from lmscope.steering.steer import Setting, interventions, steering_vectors
from lmscope.steering.store import export_control_vector, load_control_vector, load_vectors, save_vectors
from tests.steering.planted import pairs, planted


def test_safetensors_round_trip_with_metadata(tmp_path):
    vectors = {1: torch.randn(8), 3: torch.randn(8)}
    path = save_vectors(
        tmp_path / "v.safetensors", vectors, model="m", site="resid_post", method="mean_diff", data="abc"
    )
    back, meta = load_vectors(path)
    assert back.keys() == vectors.keys() and all(torch.equal(back[k], vectors[k]) for k in vectors)
    assert meta["model"] == "m" and meta["method"] == "mean_diff" and meta["layers"] == "[1, 3]"


def test_control_vector_gguf_is_what_llama_cpp_reads(tmp_path):
    vectors = {1: torch.arange(4.0), 2: -torch.arange(4.0)}
    path = export_control_vector(tmp_path / "v.gguf", vectors, "llama")
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "controlvector"
    hint = reader.fields["controlvector.model_hint"]
    assert bytes(hint.parts[hint.data[0]]).decode() == "llama"
    assert int(reader.fields["controlvector.layer_count"].parts[-1][0]) == 2
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert set(tensors) == {"direction.1", "direction.2"}
    assert tensors["direction.2"].dtype == np.float32 and list(tensors["direction.2"]) == [0, -1, -2, -3]
    with pytest.raises(LmscopeError, match="layer 0"):
        export_control_vector(tmp_path / "w.gguf", {0: torch.ones(4)}, "llama")


@torch.no_grad()
def test_reloaded_control_vector_reproduces_the_steering(tmp_path):
    model, _ = planted()
    vectors = steering_vectors(model, pairs(8), [1])
    ids = model.tokenizer("w1 w2 w3", return_tensors="pt")["input_ids"]
    steered = model.run(ids, interventions=interventions(vectors, [Setting((1,), 1.5)])).logits
    path = export_control_vector(tmp_path / "v.gguf", {1: 1.5 * vectors[1]}, model.hf.config.model_type)
    again = model.run(ids, interventions=interventions(load_control_vector(path), [Setting((1,), 1.0)])).logits
    torch.testing.assert_close(again, steered)
    assert not torch.allclose(model.run(ids).logits, steered)


def test_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(LmscopeError):
        load_control_vector(bad)
    with pytest.raises(LmscopeError, match="cannot read"):
        load_vectors(bad)
