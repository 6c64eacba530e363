"""Agreement math against hand-computed and published values."""

import pytest

from rlhfkit.annotate.agreement import agreement_report, krippendorff_alpha, percent_agreement, project_agreement

N = None
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the 4 observers x 12 units example with
# missing values; the paper gives alpha = 0.743 (nominal) and 0.849 (interval).
RELIABILITY_DATA = [[1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
                    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
                    [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
                    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N]]
UNITS = [[row[i] for row in RELIABILITY_DATA if row[i] is not None] for i in range(12)]


def test_krippendorff_published_example():
    assert krippendorff_alpha(UNITS, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(UNITS, "interval") == pytest.approx(0.849, abs=5e-4)


def test_alpha_hand_computed_two_coders():
    # units (A,A), (A,B): coincidences o_AA = 2, o_AB = o_BA = 1; n_A = 3, n_B = 1, n = 4.
    # D_o ~ (n-1) * sum o_ck d = 3 * 2 = 6; D_e ~ sum n_c n_k d = 2 * 3 * 1 = 6  =>  alpha = 1 - 6/6 = 0.
    assert krippendorff_alpha([["A", "A"], ["A", "B"]]) == pytest.approx(0.0)
    # perfect agreement with two different values: alpha = 1
    assert krippendorff_alpha([["A", "A"], ["B", "B"]]) == pytest.approx(1.0)
    # only one value ever used: expected disagreement 0, alpha undefined
    assert krippendorff_alpha([["A", "A"], ["A", "A"]]) is None
    # units with a single value carry no information
    assert krippendorff_alpha([["A"], ["B"]]) is None


def test_percent_agreement_hand_computed():
    # unit 1: 3 coders A,A,B -> agreeing ordered pairs 2*1 = 2 of 3*2 = 6 -> 1/3; unit 2: B,B -> 1; mean 2/3.
    assert percent_agreement([["A", "A", "B"], ["B", "B"], ["A"]]) == pytest.approx(2 / 3)
    assert percent_agreement([["A"]]) is None


def test_report_per_pair_and_project_labels():
    values = {(1, "x"): "A", (1, "y"): "A", (1, "z"): "B", (2, "x"): "B", (2, "y"): "B", (3, "x"): "A",
              (3, "z"): "A"}
    rep = agreement_report(values)
    pairs = {(p["a"], p["b"]): p for p in rep["pairs"]}
    assert pairs[("x", "y")]["items"] == 2 and pairs[("x", "y")]["percent_agreement"] == 1.0
    assert pairs[("x", "z")]["items"] == 2 and pairs[("x", "z")]["percent_agreement"] == 0.5
    assert pairs[("y", "z")]["items"] == 1 and pairs[("y", "z")]["percent_agreement"] == 0.0
    labels = [{"item_id": 1, "annotator": "x", "kind": "rating", "ratings": {"a": 5, "b": 7}, "choice": None},
              {"item_id": 1, "annotator": "y", "kind": "rating", "ratings": {"a": 5, "b": 7}, "choice": None},
              {"item_id": 2, "annotator": "x", "kind": "rating", "ratings": {"a": 1, "b": 1}, "choice": None},
              {"item_id": 2, "annotator": "y", "kind": "rating", "ratings": {"a": 1, "b": 1}, "choice": None}]
    out = project_agreement(labels)
    assert out["rating"]["krippendorff_alpha"] == 1.0 and out["rating"]["metric"] == "interval"
    assert set(out["rating"]["criteria"]) == {"a", "b"}
