"""The latent analysis (vqdiff.analysis, vqdiff-embed / -similar / -norms) on small real data."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SUBJECT, needs_data

pytestmark = needs_data
AFQ = SUBJECT.parent / "crosssubject" / "afq_browser"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def codec():
    from vqdiff.codec import Codec

    return Codec.default()


@pytest.fixture(scope="module")
def bundles():
    from vqdiff.io import load_bundle

    return {n: load_bundle(SUBJECT / f"{n}.trk") for n in ("ILF_R", "POPT_R", "PYT_L")}


def _encode(codec, streamlines, name):
    from vqdiff.bundle import Bundle, SpatialHeader

    return codec.encode(Bundle(streamlines=list(streamlines), header=SpatialHeader.identity(), name=name))


@pytest.fixture(scope="module")
def lat(codec, bundles):
    return {n: codec.encode(b) for n, b in bundles.items()}


def _cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_embedding_is_invariant_to_the_order_of_groups_and_streamlines_in_a_file(codec, bundles):
    from vqdiff.analysis import embedding

    a = _encode(codec, bundles["ILF_R"].streamlines[:200], "ILF_R")  # 4 groups, the last one padded
    assert not a.pad_mask.all()
    rng = np.random.default_rng(1)
    g = np.roll(np.arange(a.n_groups), 1)  # the groups reordered (the padded one first), their slots with them
    slots = (g[:, None] * 64 + np.arange(64)).ravel()
    b = dataclasses.replace(a, latents=a.latents[g], order=a.order[slots], pad_mask=a.pad_mask[slots], indices=None)
    relabel = rng.permutation(a.n_streamlines)  # streamline i of the file becomes streamline relabel[i]
    inv = np.argsort(relabel)
    c = dataclasses.replace(b, order=relabel[b.order], flipped=b.flipped[inv], n_points=b.n_points[inv])
    c._check()  # still a consistent latents file
    assert not np.array_equal(b.latents, a.latents)
    np.testing.assert_allclose(embedding(b), embedding(a), rtol=0, atol=1e-12)
    np.testing.assert_allclose(embedding(c), embedding(a), rtol=0, atol=1e-12)
    assert embedding(a).shape == (1024,)


def test_shuffled_input_streamlines_give_the_same_embedding(codec, bundles, lat):
    from vqdiff.analysis import embedding

    s = bundles["POPT_R"].streamlines
    perm = np.random.default_rng(2).permutation(len(s))
    shuffled = _encode(codec, [s[i] for i in perm], "POPT_R")
    assert _cos(embedding(shuffled), embedding(lat["POPT_R"])) > 0.999


def test_half_of_the_streamlines_give_a_close_embedding(codec, bundles, lat):
    from vqdiff.analysis import embedding

    s = bundles["PYT_L"].streamlines
    half = np.random.default_rng(3).choice(len(s), len(s) // 2, replace=False)
    assert _cos(embedding(_encode(codec, [s[i] for i in half], "PYT_L")), embedding(lat["PYT_L"])) >= 0.95


def test_registration_features_read_the_recorded_transform():
    from vqdiff.analysis import registration_features
    from vqdiff.training.augment import rotation_matrix

    m = np.eye(4)
    m[:3, :3] = 1.1 * rotation_matrix(np.radians([0.0, 0.0, 20.0]))
    m[:3, 3] = [1, 2, 3]
    f = registration_features(m, {"method": "similarity", "residual_mm": 5.0})
    assert f["reg_scale"] == pytest.approx(1.1) and f["reg_rotation_deg"] == pytest.approx(20.0)
    assert (f["reg_tx_mm"], f["reg_residual_mm"]) == (1.0, 5.0)


def test_tract_key_uses_the_template_when_known_or_named_alike():
    from vqdiff.analysis.tables import tract_key

    assert tract_key("IFOF_L", "IFOF_L", True) == "IFOF_L"
    assert tract_key("Left_Corticospinal", "PYT_L", False) == "PYT_L"  # unknown (odd shape) but named alike
    assert tract_key("Right_Corticospinal", "PYT_L", False) == "Right_Corticospinal"  # the other side
    assert tract_key("Left_Thalamic_Radiation", "FPT_L", False) == "Left_Thalamic_Radiation"
    assert tract_key("Callosum_Forceps_Minor", "CC_Fr_1", False) == "CC_Fr_1"


def _batch_folder(tmp_path, lat, subjects=("sub-01",)):
    out = tmp_path / "latents"
    lines = []
    for subj in subjects:
        for n, a in lat.items():
            (out / subj).mkdir(parents=True, exist_ok=True)
            a.save(out / subj / f"{n}.vqlat", overwrite=True)
            lines.append(json.dumps({"subject": subj, "bundle": n, "output": f"{subj}/{n}.vqlat", "status": "ok",
                                     "fidelity": {"mean_mdf_mm": 1.5}}))
    (out / "index.jsonl").write_text("\n".join(lines) + "\n")
    return out


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_tables_round_trip_in_both_layouts(tmp_path, lat, suffix):
    from vqdiff.analysis.tables import build_tables, embedding_columns, read_table, write_table

    folder = _batch_folder(tmp_path, lat)
    tables = build_tables([folder], layouts=("wide", "long"))
    wide, long = tables["wide"], tables["long"]
    assert list(wide.columns[:3]) == ["subject", "bundle", "tract"] and len(embedding_columns(wide)) == 1024
    assert set(wide["bundle"]) == set(lat) and wide["fidelity_mean_mdf_mm"].eq(1.5).all()
    assert list(long.columns[:4]) == ["subjectID", "tractID", "nodeID", "f0"] and len(long) == 3 * 16
    for layout, df in tables.items():
        path = write_table(df, tmp_path / f"{layout}{suffix}", layout=layout)
        back, got = read_table(path)
        assert got == layout
        assert list(back.columns) == list(df.columns)
        num = df.select_dtypes("number").columns
        np.testing.assert_allclose(back[num].to_numpy(float), df[num].to_numpy(float), rtol=1e-15, equal_nan=True)
        with pytest.raises(FileExistsError):
            write_table(df, path)


def test_similarity_finds_the_same_tract_of_another_subject(codec, lat, tmp_path):
    from vqdiff.analysis.similarity import nearest
    from vqdiff.analysis.tables import build_tables
    from vqdiff.io import load_bundle

    cohort = build_tables([_batch_folder(tmp_path, lat)])["wide"]
    for afq, expected in (("Left_Corticospinal", "PYT_L"), ("Right_ILF", "ILF_R")):
        q = codec.encode(load_bundle(AFQ / f"{afq}.trk"))
        hits = nearest(q, cohort, k=2)
        assert hits["bundle"].iloc[0] == expected
        assert hits["distance"].is_monotonic_increasing
    own = nearest(("sub-01", "PYT_L"), cohort, k=5)  # a row of the table: itself left out
    assert "PYT_L" not in set(own["bundle"]) and len(own) == 2


def test_norms_flag_a_shifted_profile_at_its_node(tmp_path):
    from vqdiff.analysis.norms import Norms, fit
    from vqdiff.analysis.scoring import score_profile

    rng = np.random.default_rng(0)
    n_nodes, d = 16, 8
    base = np.sin(np.linspace(0, 3, n_nodes * d))
    ref = base + 0.1 * rng.normal(size=(25, n_nodes * d))
    norms = fit({"T": ref}, n_nodes=n_nodes, model_sha256="a" * 64)
    normal = [score_profile(norms, "T", (base + 0.1 * rng.normal(size=n_nodes * d)).reshape(n_nodes, d))
              for _ in range(40)]
    assert np.mean([s.flagged for s in normal]) <= 0.1
    shifted = (base + 0.1 * rng.normal(size=n_nodes * d)).reshape(n_nodes, d)
    shifted[9] += 0.5
    s = score_profile(norms, "T", shifted)
    assert s.flagged and s.p_value < 1e-3 and s.peak_node == 9 and s.peak_z > 4
    back = Norms.load(norms.save(tmp_path / "n.vqnorm"))
    assert score_profile(back, "T", shifted).p_value == pytest.approx(s.p_value)
    with pytest.raises(ValueError, match="no tract 'X'"):
        score_profile(norms, "X", shifted)



def test_node_z_is_not_capped_so_the_largest_of_several_extreme_nodes_is_the_peak():
    """Far from the norm every node's tail probability underflows; z = Phi^-1(1 - p) then capped at
    ~8.2 and the first capped node won the argmax (80 % of the validation's truncations had two or
    more capped nodes). z is (log d2 - mu) / sd, computed without p: the largest deviation is the peak."""
    from vqdiff.analysis.norms import fit, standardised, tail_probability
    from vqdiff.analysis.scoring import score_profile

    rng = np.random.default_rng(0)
    n_nodes, d = 16, 8
    base = np.sin(np.linspace(0, 3, n_nodes * d))
    norms = fit({"T": base + 0.1 * rng.normal(size=(25, n_nodes * d))}, n_nodes=n_nodes)
    far = (base + 0.1 * rng.normal(size=n_nodes * d)).reshape(n_nodes, d)
    far[3:13] += 20.0  # ten extreme nodes, one of them ten times further
    far[7] += 200.0
    s = score_profile(norms, "T", far)
    z = np.sort(s.node_z)
    assert s.peak_node == 7 and z[-10] > 8.3 and len(set(z[-10:])) == 10 and s.peak_z > z[-2] + 3
    t = norms.tracts["T"]
    _, nodes = t.distances(far.reshape(1, -1))
    cal = np.asarray(t.calibration["nodes"])
    np.testing.assert_allclose(s.node_z, (np.log(nodes[0]) - cal[:, 0]) / cal[:, 1])
    # the tail probability stays positive and exact far out: P(Z >= 10) = 7.62e-24
    mu, sd = 1.0, 0.5
    d2 = np.exp(mu + sd * np.array([0.0, 10.0]))
    np.testing.assert_allclose(tail_probability(d2, (mu, sd)), [0.5, 7.6198530241605e-24], rtol=1e-9)
    np.testing.assert_allclose(standardised(d2, (mu, sd)), [0.0, 10.0])


def test_leave_one_group_out_calibration_scores_a_new_individual_as_one_of_the_reference():
    """Copies of two individuals (synthetic draws of a subject and of its mirror image): leave-one-out
    keeps each copy's siblings in the model, so a third individual looks abnormal; holding each
    individual out as a whole (group_by) calibrates on an unseen individual's distances."""
    import pandas as pd

    from vqdiff.analysis.embedding import embedding_from_profile
    from vqdiff.analysis.records import AnalysisError
    from vqdiff.analysis.scoring import fit_table, score_profile

    rng = np.random.default_rng(3)
    n_nodes, d = 16, 4
    base = np.sin(np.linspace(0, 3, n_nodes * d))
    people = base + 0.3 * rng.normal(size=(3, n_nodes * d))  # individuals differ by 0.3; copies by 0.03
    rows = [{"subject": f"s{k}{i}", "tract": "T", "source": f"person{k}", "n_nodes": n_nodes,
             **{f"e{j}": v for j, v in enumerate(embedding_from_profile(
                 (people[k] + 0.03 * rng.normal(size=n_nodes * d)).reshape(n_nodes, d)))}}
            for k in range(2) for i in range(12)]
    df = pd.DataFrame(rows)
    third = (people[2] + 0.03 * rng.normal(size=n_nodes * d)).reshape(n_nodes, d)
    loo = fit_table(df, "wide")
    grouped = fit_table(df, "wide", group_by="source")
    assert grouped.tracts["T"].calibration["held_out"] == "leave-one-group-out (2 groups)"
    assert loo.tracts["T"].calibration["held_out"] == "leave-one-out"
    assert score_profile(loo, "T", third).p_value < 1e-6
    assert score_profile(grouped, "T", third).p_value > 0.05
    with pytest.raises(AnalysisError, match="no column 'site'.*subject, tract, source"):
        fit_table(df, "wide", group_by="site")
    with pytest.raises(AnalysisError, match="2 or more groups"):
        fit_table(df.assign(source="one"), "wide", group_by="source")

def _run(*args):
    return subprocess.run([str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True, timeout=300)


def test_clis_help():
    for cmd in ("vqdiff-embed", "vqdiff-similar", "vqdiff-norms"):
        r = _run(cmd, "--help")
        assert r.returncode == 0 and "usage" in r.stdout


def _main(capsys, module, *args) -> tuple[int, str, str]:
    """Run a command's ``main`` in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    import importlib

    capsys.readouterr()
    try:
        importlib.import_module(f"vqdiff.cli.{module}").main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_clis_from_a_batch_folder_to_scores_and_figures(codec, bundles, lat, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(4)
    root = tmp_path / "cohort"
    for i in range(6):  # six reference "subjects": random 80 % of two real bundles
        for n in ("ILF_R", "POPT_R"):
            s = bundles[n].streamlines
            keep = rng.choice(len(s), int(0.8 * len(s)), replace=False)
            _encode(codec, [s[k] for k in keep], n).save(root / f"ref{i}" / f"{n}.vqlat")
    table = tmp_path / "cohort.parquet"
    code, out, err = _main(capsys, "embed", root, table)
    assert code == 0, err
    assert json.loads(out)["bundles"] == 12
    code, _, err = _main(capsys, "embed", root, table)
    assert code != 0 and "exists" in err  # refuses to overwrite without -f
    code, out, err = _main(capsys, "similar", "ref0/ILF_R", table, "--k", "3", "--json")
    assert code == 0, err
    assert [h["bundle"] for h in json.loads(out)] == ["ILF_R"] * 3
    norms = tmp_path / "n.vqnorm"
    code, _, err = _main(capsys, "norms", "fit", table, norms, "--label", "test reference")
    assert code == 0, err
    import pandas as pd

    grouped = tmp_path / "grouped.parquet"  # copies of two "individuals": held out as groups
    pd.read_parquet(table).assign(source=lambda t: t["subject"].map(lambda s: "a" if s < "ref3" else "b")).to_parquet(grouped)
    code, _, err = _main(capsys, "norms", "fit", grouped, tmp_path / "g.vqnorm", "--group-by", "source")
    assert code == 0, err
    from vqdiff.analysis.norms import Norms

    cal = Norms.load(tmp_path / "g.vqnorm").tracts["ILF_R"].calibration
    assert cal["held_out"] == "leave-one-group-out (2 groups)"
    code, _, err = _main(capsys, "norms", "fit", grouped, tmp_path / "h.vqnorm", "--group-by", "site")
    assert code != 0 and "no column 'site'" in err and "source" in err
    subject = _batch_folder(tmp_path, {n: lat[n] for n in ("ILF_R", "POPT_R", "PYT_L")})
    code, out, err = _main(capsys, "norms", "score", subject, "--norms", norms, "--out-table", tmp_path / "s.csv",
                           "--out-figures", tmp_path / "figs")
    assert code == 0, err
    assert "not scored: sub-01/PYT_L" in out  # no norm for it: said, not dropped silently
    scored = json.loads(out[out.index("{"):])["scored"]
    assert {s["bundle"] for s in scored} == {"ILF_R", "POPT_R"}
    assert len(list((tmp_path / "figs").glob("*.png"))) == 2
    assert list(pd.read_csv(tmp_path / "s.csv")["bundle"]) == [s["bundle"] for s in scored]


def test_clear_errors_for_bad_inputs(lat, tmp_path, capsys):
    from vqdiff.analysis import AnalysisError, iter_records
    from vqdiff.analysis.norms import fit
    from vqdiff.analysis.records import LatentsRecord
    from vqdiff.analysis.scoring import score_records

    (tmp_path / "empty").mkdir()
    code, _, err = _main(capsys, "embed", tmp_path / "empty", tmp_path / "t.csv")
    assert code == 2 and "no latents found" in err and "Traceback" not in err
    other = dataclasses.replace(lat["PYT_L"], model={**lat["PYT_L"].model, "sha256": "b" * 64})
    lat["ILF_R"].save(tmp_path / "mixed" / "s" / "ILF_R.vqlat")
    other.save(tmp_path / "mixed" / "s" / "PYT_L.vqlat")
    with pytest.raises(AnalysisError, match="mixed models"):
        list(iter_records([tmp_path / "mixed"]))
    code, _, err = _main(capsys, "embed", tmp_path / "mixed", tmp_path / "t.csv")
    assert code == 2 and "mixed models" in err
    norms = fit({"T": np.random.default_rng(0).normal(size=(6, 1024))}, n_nodes=16)
    with pytest.raises(AnalysisError, match="no bundle could be scored.*tracts T"):
        score_records([LatentsRecord("s", "ILF_R", Path("x"), lat["ILF_R"])], norms)
    code, _, err = _main(capsys, "similar", "a/b", tmp_path / "missing.csv")
    assert code == 2 and "does not exist" in err
    code, _, err = _main(capsys, "norms", "score", tmp_path / "mixed", "--norms", tmp_path / "missing.vqnorm")
    assert code == 2 and "does not exist" in err and "vqdiff-norms fit" in err


def test_a_subject_file_gives_one_row_per_bundle_with_its_fidelity(codec, bundles, lat, tmp_path):
    """A subject file (here: 120 streamlines of each of 3 subject01 bundles in one file, encoded part by
    part) is read as one record per bundle, named by its part, with the fidelity the encoding measured."""
    from vqdiff.analysis import embedding
    from vqdiff.analysis.records import iter_records
    from vqdiff.analysis.tables import build_tables
    from vqdiff.bundle import Bundle, SpatialHeader

    names = list(bundles)
    streamlines = [s for n in names for s in bundles[n].streamlines[:120]]
    parts = [(n, np.arange(120) + 120 * i) for i, n in enumerate(names)]
    subject = codec.encode_subject(Bundle(streamlines, SpatialHeader.identity(), name="sub-01"), parts=parts)
    path = subject.save(tmp_path / "sub-01.vqlat")
    recs = list(iter_records([path]))
    assert [(r.subject, r.bundle) for r in recs] == [("sub-01", n) for n in names]
    for r in recs:
        assert r.latents.n_streamlines == 120
        assert _cos(embedding(r.latents), embedding(lat[r.bundle])) > 0.95  # the part is that bundle
    wide = build_tables([tmp_path])["wide"]
    assert list(wide["bundle"]) == names
    assert (wide["fidelity_mean_mdf_mm"] > 0).all() and (wide["fidelity_mean_mdf_mm"] < 2).all()
