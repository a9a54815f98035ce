"""The offline diagnostics of experiments/ (the end-to-end call is in distributed/test_train)."""

import json

import numpy as np
import pytest

from experiments.diagnose_gap import canonical_caption
from gckd_ray.data.synthetic import CAPTION_STYLES


def test_canonical_caption_writes_synonyms_back_as_source_words():
    synonyms = dict(CAPTION_STYLES["icfg"].synonyms)
    text = ("The young woman is dressed in a crimson blouse over denim pants and gray sneakers. "
            "She has short pants? No: a Lady with a rucksack.")
    assert canonical_caption(text, synonyms) == (
        "The woman is dressed in a red shirt over jeans and grey shoes. "
        "She has shorts? No: a woman with a backpack.")
    assert canonical_caption("A man in red jeans.", synonyms) == "A man in red jeans."


def _fake_results(r1: float) -> dict:
    final = {"R1": r1, "R5": r1 + 10, "R10": r1 + 20, "mAP": r1 + 5, "mINP": r1 + 1}
    return {"selection": "last epoch", "protocol": "x", "method": "gckd", "final": final,
            "history": [{"epoch": 1, "R1": r1 / 2}, {"epoch": 2, "R1": r1}]}


def test_protocol_table_plots_and_results_section(tmp_path):
    from PIL import Image

    from experiments import run_protocols

    table = {"C2I": {"source_only": [_fake_results(10.0), _fake_results(12.0)],
                     "gckd": [_fake_results(30.0), _fake_results(34.0)]},
             "R2C": {"source_only": [_fake_results(5.0), _fake_results(5.0)],
                     "gckd": [_fake_results(20.0), _fake_results(22.0)]}}
    text = run_protocols.markdown(table, [0, 1], ["train.epochs=3"])
    assert "| C2I (synth-cuhk -> synth-icfg) | gckd | 32.00 ± 2.00 |" in text
    assert "| R2C (synth-rstp -> synth-cuhk) | source_only | 5.00 ± 0.00 |" in text
    assert "selection: last epoch" in text and "`train.epochs=3`" in text
    one_seed = run_protocols.markdown({"C2I": {"gckd": [_fake_results(30.0)]}}, [0], [])
    assert "| C2I (synth-cuhk -> synth-icfg) | gckd | 30.00 | 40.00 |" in one_seed
    summary = run_protocols.r1_summary(table)
    assert "| protocol | source_only | gckd | gckd − source_only |" in summary
    assert "| C2I | 11.00 | 32.00 | +21.00 |" in summary
    assert "| mean | 8.00 | 26.50 | +18.50 |" in summary
    published = run_protocols.published_table(["C2I", "R2C"])
    assert "| C2I (cuhk -> icfg) | 43.04 | 63.46 |" in published
    assert "| R2C (rstp -> cuhk) | 35.25 | 73.38 |" in published
    assert "not reproduced" in published
    for plot in (run_protocols.plot_bars, run_protocols.plot_curves):
        path = tmp_path / f"{plot.__name__}.png"
        plot(table, path)
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size[0] > 300

    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\n\nkept above\n")
    run_protocols.update_results_doc(doc, "first\n")
    run_protocols.update_results_doc(doc, "second\n")  # replaces, never duplicates
    assert doc.read_text() == ("# Results\n\nkept above\n\n<!-- protocols:begin -->\nsecond\n"
                               "<!-- protocols:end -->\n")


def test_run_table_reuses_recorded_finals_and_says_so(tmp_path, capsys):
    import json

    from experiments import run_table

    final = {"R1": 30.0, "R5": 60.0, "R10": 70.0, "mAP": 40.0, "mINP": 35.0}
    recorded = tmp_path / "earlier.json"
    recorded.write_text(json.dumps({"oracle": [{"seed": 0, **final},
                                               {"seed": 1, **dict(final, R1=34.0)}]}))
    out = tmp_path / "table.md"
    assert run_table.main(["--variants", "oracle", "--seeds", "0", "1", "--runs",
                           str(tmp_path / "runs"), "--out", str(out),
                           "--recorded", str(recorded)]) == 0  # nothing to run: all recorded
    text = out.read_text()
    assert "| oracle | labelled (upper bound) | 32.00 ± 2.00 |" in text
    assert f"2 of 2 runs reused from the recorded finals of: `{recorded}`" in text
    assert json.loads(out.with_suffix(".json").read_text())["oracle"][1]["R1"] == 34.0


def test_run_one_prefers_the_finished_run_then_the_recorded_final_and_starts_nothing(tmp_path):
    import json

    from experiments import run_table

    finished = tmp_path / "gckd-seed0"
    finished.mkdir()
    (finished / "results.json").write_text(json.dumps(_fake_results(30.0)))
    recorded = {"final": dict(_fake_results(99.0)["final"]), "recorded_in": "earlier.json"}
    starts = []
    assert run_table.run_one("gckd", 0, tmp_path, [], recorded,
                             lambda: starts.append(0))["final"]["R1"] == 30.0
    assert run_table.run_one("gckd", 1, tmp_path, [], recorded, lambda: starts.append(1)) is recorded
    assert starts == []  # neither waited for a start slot


def test_a_variants_switches_win_over_the_tables_overrides():
    from experiments import run_table

    from gckd_ray.config import load_config

    table = ["graph.enabled=true", "train.epochs=3"]
    cfg = load_config(None, run_table.variant_overrides("gckd_no_graph", table))
    assert cfg.graph.enabled is False and cfg.train.epochs == 3
    assert load_config(None, run_table.variant_overrides("gckd", table)).graph.enabled is True


def test_protocols_reuse_finished_runs_and_recorded_finals_and_say_so(tmp_path):
    import json

    from experiments import run_protocols

    finished = tmp_path / "runs" / "C2I" / "gckd-seed0"
    finished.mkdir(parents=True)
    (finished / "results.json").write_text(json.dumps(_fake_results(30.0)))
    row = {"R1": 10.0, "R5": 20.0, "R10": 30.0, "mAP": 15.0, "mINP": 12.0}
    recorded = tmp_path / "earlier.json"
    recorded.write_text(json.dumps({"C2I": {
        "source_only": [{"seed": 0, **row}, {"seed": 1, **dict(row, R1=12.0)}],
        "gckd": [{"seed": 0, **dict(row, R1=99.0)}, {"seed": 1, **dict(row, R1=34.0)}]}}))
    out, doc = tmp_path / "protocols.md", tmp_path / "RESULTS.md"
    assert run_protocols.main(["--protocols", "C2I", "--variants", "source_only", "gckd",
                               "--seeds", "0", "1", "--runs", str(tmp_path / "runs"),
                               "--out", str(out), "--doc", str(doc),
                               "--recorded", str(recorded)]) == 0  # nothing left to run
    text = out.read_text()
    assert f"3 of 4 runs reused from the recorded finals of: `{recorded}`" in text
    # the finished run's own results.json wins over a recorded final for the same seed
    assert "| C2I (synth-cuhk -> synth-icfg) | gckd | 32.00 ± 2.00 |" in text
    assert "| C2I | 11.00 | 32.00 | +21.00 |" in doc.read_text()
    assert json.loads(out.with_suffix(".json").read_text())["C2I"]["gckd"][1]["R1"] == 34.0
    assert out.with_name("protocols_curves.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        run_protocols.main(["train.epochs=3", "--recorded", str(recorded)])


def test_table_commands_refuse_a_contradiction_before_any_run(tmp_path, capsys):
    from experiments import run_protocols, run_table

    for main in (run_table.main, run_protocols.main):
        with pytest.raises(SystemExit) as stop:
            main(["--variants", "source_only", "gckd", "--runs", str(tmp_path / "runs"),
                  "train.epochs=3"])
        assert stop.value.code == 2
        assert "variant gckd: config error: gckd.warmup_epochs=10 >= train.epochs=3" in \
            capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_pseudo_curves_scores_pairs_sharing_a_pseudo_id_against_person_ids():
    from experiments.pseudo_curves import score_refresh

    # pseudo-id 0: images of persons 5 and 6, a caption of 5; pseudo-id 1: an image of 7,
    # captions of 7 and 9; the last image and caption have none.
    scored = score_refresh(np.array([0, 0, 1, -1]), np.array([0, 1, 1, -1]),
                           np.array([5, 6, 7, 8]), np.array([5, 7, 9, 5]))
    assert scored == {"pairs": 4, "pair_precision": 0.5, "image_pairs": 1,
                      "image_pair_precision": 0.0, "image_coverage": 0.75,
                      "text_coverage": 0.75}
    nothing = score_refresh(np.array([-1]), np.array([-1]), np.array([1]), np.array([1]))
    assert nothing["pairs"] == 0 and nothing["pair_precision"] is None


def test_graph_precision_scores_each_edge_by_the_persons_it_joins():
    import torch

    from experiments.graph_precision import node_identities, score_graph

    # Pairs of nodes 1 degree apart, pairs 90 degrees apart, k=1: 0<->1 (source image and
    # caption of person 1), 2<->3 (target image and caption of person 1), 4<->5 (a target
    # image of person 2 and a source caption of person 2: other domains, never one person).
    angles = torch.tensor([0.0, 1.0, 90.0, 91.0, 180.0, 181.0]).deg2rad()
    feats = torch.stack([angles.cos(), angles.sin()], 1)
    person = np.array([2, 2, 3, 3, 5, 4])  # node_identities' space: 2p source, 2q+1 target
    is_target = np.array([False, False, True, True, True, False])
    is_text = np.array([False, True, False, True, False, True])
    scored = score_graph(feats, person, np.arange(6), is_target, is_text, k=1)
    assert scored == pytest.approx({
        "edge_precision": 4 / 6, "target_edge_precision": 2 / 3,
        "target_cross_modal_precision": 1.0, "cross_domain_share": 1 / 3,
        "target_edge_ceiling": 2 / 3})
    # two copies of one caption (item 1 pushed twice) are no evidence: that edge is not scored
    copies = score_graph(feats, person, np.array([1, 1, 2, 3, 4, 5]), is_target, is_text, k=1)
    assert copies["edge_precision"] == pytest.approx(2 / 4)  # 0<->1 dropped
    memory = {"image_domain": np.array([0, 1, 1]), "image_labels": np.array([7, -1, -1]),
              "image_indices": np.array([3, 0, 1])}
    assert node_identities(memory, "image", np.array([7, 9])).tolist() == [14, 15, 19]


def test_spearman_uses_average_ranks_and_refuses_too_little():
    from experiments.selection_check import spearman

    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # ties: x ranks (0.5, 0.5, 2, 3) against y ranks (0, 1, 2, 3): Pearson of the ranks
    assert spearman([5, 5, 6, 7], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_selection_check_reads_runs_and_reports_within_and_across(tmp_path, capsys):
    from experiments import selection_check

    def run(name, points):
        out = tmp_path / name
        out.mkdir()
        lines = [{"kind": "train", "epoch": 1, "losses": {}}]
        lines += [{"kind": "eval", "epoch": e, "metrics": {"target_mnn": m, "R1": r}}
                  for e, (m, r) in enumerate(points, 1)]
        lines.append({"kind": "eval", "epoch": 9, "metrics": {"target_mnn": 1.0}})  # no R1
        (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        return str(out)

    a = run("a", [(1.0, 10.0), (2.0, 20.0), (3.0, 15.0)])  # picks epoch 3: R1 15, best 20
    b = run("b", [(1.0, 5.0), (2.0, 6.0), (4.0, 7.0)])
    assert selection_check.main([a, b, "--out", str(tmp_path / "t.md")]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["mean_rho_within_runs"] == pytest.approx((0.5 + 1.0) / 2)
    assert last["rho_across_runs"] is None  # two runs: too few to rank
    assert last["picked_minus_last_R1"] == 0.0
    assert "| 3 | 15.00 | 20.00 | 15.00 |" in (tmp_path / "t.md").read_text()
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        selection_check.main([str(tmp_path)])
