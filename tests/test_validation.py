"""The serving gate: contract, finite outputs, golden rows, warm-up budget (no registry)."""

from __future__ import annotations

import numpy as np
import onnx
import orjson
import pytest

from inference.testing import golden_for, loaded, make_onnx_classifier, poison_with_nan
from inference.validation import GoldenRows, ModelContract, ValidationPolicy, validate
from tickserve.errors import ModelRejected

N = 4


@pytest.fixture(scope="module")
def good() -> bytes:
    return make_onnx_classifier(N, "logistic", seed=1)


def _golden(model: bytes) -> GoldenRows:
    return GoldenRows.parse(orjson.dumps(golden_for(model, N)), N)


def test_a_good_model_passes_and_yields_its_contract(good: bytes) -> None:
    contract = validate(loaded(good, N).scorer, _golden(good), ValidationPolicy())
    assert [t.name for t in contract.inputs] == ["X"]
    assert contract.inputs[0].shape == (None, N)
    assert {t.name for t in contract.outputs} == {"label", "probabilities"}
    # another model family with the same interface may replace it
    hgb = make_onnx_classifier(N, "hgb", seed=2, max_iter=20)
    assert validate(loaded(hgb, N).scorer, _golden(hgb), ValidationPolicy(), contract) == contract


def test_golden_rows_that_do_not_reproduce_are_refused(good: bytes) -> None:
    doc = golden_for(good, N)
    doc["p_up"][3] += 1e-4
    golden = GoldenRows.parse(orjson.dumps(doc), N)
    with pytest.raises(ModelRejected, match="golden") as info:
        validate(loaded(good, N).scorer, golden, ValidationPolicy())
    assert info.value.reason == "golden"
    # within tolerance passes
    doc["p_up"][3] -= 1e-4 - 5e-6
    validate(loaded(good, N).scorer, GoldenRows.parse(orjson.dumps(doc), N), ValidationPolicy())


def test_nan_outputs_are_refused(good: bytes) -> None:
    bad = poison_with_nan(good)
    with pytest.raises(ModelRejected, match="NaN") as info:
        validate(loaded(bad, N).scorer, _golden(good), ValidationPolicy())
    assert info.value.reason == "nonfinite"


def test_another_interface_is_refused(good: bytes) -> None:
    contract = ModelContract.of(loaded(good, N).scorer)
    model = onnx.load_from_string(good)
    for node in model.graph.node:
        node.output[:] = ["probs" if o == "probabilities" else o for o in node.output]
    for out in model.graph.output:
        if out.name == "probabilities":
            out.name = "probs"
    renamed = model.SerializeToString()
    with pytest.raises(ModelRejected, match="outputs are") as info:
        validate(loaded(renamed, N).scorer, _golden(good), ValidationPolicy(), contract)
    assert info.value.reason == "contract"


def test_a_slow_warm_up_is_refused(good: bytes) -> None:
    with pytest.raises(ModelRejected, match="warm-up") as info:
        validate(loaded(good, N).scorer, _golden(good), ValidationPolicy(warmup_budget_s=0.0))
    assert info.value.reason == "warmup"


@pytest.mark.parametrize(
    "raw",
    [b"{", b'{"inputs": [[1, 2, 3, 4]]}', b'{"inputs": [[1, 2]], "p_up": [0.5]}',
     b'{"inputs": [], "p_up": []}', b'{"inputs": [[1, 2, 3, 4]], "p_up": [0.5, 0.1]}'],
)  # fmt: skip
def test_malformed_golden_rows_are_refused(raw: bytes) -> None:
    with pytest.raises(ModelRejected) as info:
        GoldenRows.parse(raw, N)
    assert info.value.reason == "golden_missing"


def test_golden_rows_parse(good: bytes) -> None:
    golden = _golden(good)
    assert golden.inputs.dtype == np.float32 and golden.inputs.shape == (32, N)
    assert golden.p_up.shape == (32,)
