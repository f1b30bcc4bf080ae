"""The report: paper numbers as data, cells filled from run records, tables in three formats, figures."""

import csv
import io

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fqbench.app import CONF_DIR, build_method
from fqbench.records import config_hash, write_record
from fqbench.report import TABLES, build, finished_records, paper_numbers, paper_value, to_csv, to_latex, to_markdown
from fqbench.report.__main__ import main as report_main
from fqbench.report.figures import FIGURES, _series, write_figures


@pytest.fixture(scope="module")
def make_record():
    """A finished record as the app writes it, for a real composed config and given metrics."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        def make(model, overrides=(), metrics=None, finished_at="2024-01-01T00:00:00", **extra):
            cfg = compose("config", overrides=[f"model={model}", *overrides])
            config = OmegaConf.to_container(cfg, resolve=True)
            choices = {"model": model, **{o.split("=")[0]: o.split("=")[1] for o in overrides if o.startswith(("variant=", "method="))}}
            return {"status": "ok", "config": config, "config_hash": config_hash(config), "choices": choices,
                    "method": build_method(cfg.method).name, "metrics": metrics or {}, "finished_at": finished_at,
                    "layers": [], **extra}

        yield make


def write(root, name, record):
    write_record(root / name, record)


def test_paper_numbers_are_complete_and_placed_in_their_tables():
    numbers = paper_numbers()
    per_table = {}
    for table, row, column in numbers:
        per_table[table] = per_table.get(table, 0) + 1
        spec = TABLES[table]
        assert row in [r.id for r in spec.rows] and column in [c.id for c in spec.columns], (table, row, column)
    # Table 1: 8 rows x 10 models; Table 2: 8 x 5 minus PTQ4ViT's two missing Swin-L cells; Table 5: 5 x 6;
    # Table 10: 6 x 2; Table 13: 5 x 7 minus the OPT-350M column nobody published; Table 14: 5 x 6.
    assert per_table == {"table1": 80, "table2": 38, "table5": 30, "table10": 12, "table13": 30, "table14": 30}
    assert paper_value("table1", "fq_w2_r1.1", "vit_b").text == "80.93"
    assert paper_value("table2", "ptq4vit_w2", "vit_h").value == 0.18
    assert paper_value("table2", "ptq4vit_w2", "swin_l") is None
    assert paper_value("table5", "gptq_w2", "opt_125m").value == 5700.0
    assert paper_value("table5", "fp", "llama2_70b").text == "3.32"
    assert paper_value("table10", "llama2_70b:gptq_clip_w2", "c4").text == "1.12e3"
    assert paper_value("table13", "fp", "opt_350m") is None
    assert paper_value("table13", "fq_w2_r1.1", "llama2_7b").source == "FrameQuant README"
    assert paper_value("table14", "fq_w2_r1.1", "piqa").source == "paper"
    assert paper_value("table14", "gptq_w2", "arc_easy").text == "24.58"
    assert not any(key[0] in ("table3", "table8", "table9", "table11") for key in numbers)  # lost from the text


def test_a_table_from_records_places_ours_next_to_the_paper(tmp_path, make_record):
    write(tmp_path, "a", make_record("vit_s", ["variant=fq_w2_r1.1"], {"top1": 61.0, "fp_top1": 81.2}))
    # an ad-hoc run with the same method config fills the r = 1.0 row (matching is by what was computed)
    write(tmp_path, "b", make_record("vit_b", ["method=framequant", "redundancy=1.0"], {"top1": 79.0}, seed=0))
    write(tmp_path, "c", make_record("vit_b", ["method=framequant", "redundancy=1.0", "seed=1"], {"top1": 80.0}))
    # another clip threshold is another recipe: it fills no cell
    write(tmp_path, "d", make_record("vit_t", ["variant=fq_w2_r1.0", "method.clip_sigma=3.0"], {"top1": 50.0}))
    write(tmp_path, "e", {**make_record("vit_t", ["variant=gptq_w2"], {"top1": 1.0}), "status": "failed"})
    table = build(TABLES["table1"], finished_records(tmp_path))

    cell = table.cell("fq_w2_r1.1", "vit_s")
    assert cell.ours == 61.0 and cell.paper.text == "61.51" and cell.diff == pytest.approx(-0.51)
    averaged = table.cell("fq_w2_r1.0", "vit_b")
    assert averaged.ours == pytest.approx(79.5) and len(averaged.records) == 2  # seeds are averaged
    fp = table.cell("fp", "vit_s")  # no FP job: the FP baseline measured inside the quantized job
    assert fp.ours == 81.2 and fp.source
    assert table.cell("fq_w2_r1.0", "vit_t").ours is None and table.cell("gptq_w2", "vit_t").ours is None

    markdown = to_markdown(table)
    line = next(l for l in markdown.splitlines() if l.startswith("| FrameQuant (r = 1.1) |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0:2] == ["FrameQuant (r = 1.1)", "2.2"]
    assert cells[2:4] == ["– / 25.79", "61.00 / 61.51 (−0.51)"]  # ViT-T has no record of ours, ViT-S has
    header = markdown.splitlines()[2]
    assert "ViT S" in header and "Swin B/384" in header

    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    fq = next(r for r in rows if r["Method"] == "FrameQuant (r = 1.1)")
    assert (float(fq["ViT S ours"]), fq["ViT S paper"], float(fq["ViT S diff"])) == (61.0, "61.51", pytest.approx(-0.51))
    assert fq["ViT T ours"] == "" and fq["ViT T paper"] == "25.79"

    latex = to_latex(table)
    assert "\\multicolumn{4}{c}{ViT}" in latex and "\\multicolumn{3}{c}{Swin}" in latex
    assert "61.00 / 61.51 ($-$0.51)" in latex and latex.count("\\\\") == 1 + 1 + 8


def test_table_with_rows_of_models_and_metric_columns(tmp_path, make_record):
    write(tmp_path, "a", make_record("llama2_7b", ["variant=gptq_clip_w2"], {"wikitext2_ppl": 9000.0, "c4_ppl": 7000.0}))
    table = build(TABLES["table10"], finished_records(tmp_path))
    assert table.cell("llama2_7b:gptq_clip_w2", "wikitext2").ours == 9000.0
    markdown = to_markdown(table)
    assert "| Llama2 7B | GPTQ with clipping | 9.0e3 / 9.45e3 (−450.00) | 7.0e3 / 7.40e3 (−400.00) |" in markdown
    assert "| Llama2 70B | FrameQuant with clipping | – / 5.5 | – / 7.85 |" in markdown


def test_calibration_table_matches_the_override(tmp_path, make_record):
    write(tmp_path, "a", make_record("vit_s", ["variant=fq_w2_r1.1", "calib.nsamples=32"], {"top1": 55.0}))
    write(tmp_path, "b", make_record("vit_s", ["variant=fq_w2_r1.1"], {"top1": 60.0}))  # 128 images
    table = build(TABLES["table9"], finished_records(tmp_path))
    assert table.cell("32", "vit_s").ours == 55.0 and table.cell("128", "vit_s").ours == 60.0
    assert table.cell("64", "vit_s").ours is None and table.cell("32", "vit_s").paper is None


def test_cli_writes_every_table_and_figure(tmp_path, make_record, capsys):
    runs = tmp_path / "runs"
    write(runs, "a", make_record("opt_125m", ["variant=fp"], {"wikitext2_ppl": 27.6, "c4_ppl": 26.6}))
    write(runs, "b", make_record("opt_125m", ["variant=fq_w2_r1.1"], {"wikitext2_ppl": 140.0, "c4_ppl": 95.0},
                                 bits_per_weight=2.6, nominal_bits=2.2))
    assert report_main([str(runs), "--all"]) == 0
    out = runs / "report"
    for table_id in TABLES:
        for suffix in (".md", ".tex", ".csv", "_cells.csv"):
            assert (out / f"{table_id}{suffix}").stat().st_size > 0
    assert "27.60 / 27.65 (−0.05)" in (out / "table5.md").read_text()
    assert "**table5**" in capsys.readouterr().out
    for name in FIGURES:
        png = (out / "figures" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_figures_from_sweeps(tmp_path, make_record):
    records = []
    for model, base in (("vit_s", 40.0), ("deit3_s", 60.0)):
        for r, gain in (("1.0", 0.0), ("1.1", 10.0), ("1.25", 14.0), ("1.5", 16.0)):
            records.append(make_record(model, [f"variant=fq_w2_r{r}"], {"top1": base + gain},
                                       effective_redundancy=float(r) ** 2, bits_per_weight=2 * float(r) ** 2 + 0.1,
                                       nominal_bits=2 * float(r)))
        for clip in (1.0, 2.0, 3.0):
            records.append(make_record(model, ["variant=fq_w2_r1.1", f"method.clip_sigma={clip}"], {"top1": base + clip}))
        records.append(make_record(model, ["variant=fq_w2_r1.1", "method.clip_sigma=auto"], {"top1": base + 2.5}))
        for bits in (2, 3, 4):
            records.append(make_record(model, [f"variant=gptq_w{bits}"], {"top1": base * bits / 4},
                                       bits_per_weight=bits + 0.25, nominal_bits=bits))
            records.append(make_record(model, [f"variant=fq_auto_w{bits}"], {"top1": base * bits / 3.5},
                                       bits_per_weight=bits + 0.4, nominal_bits=bits))
        for budget in ("2.25", "2.5", "3.0"):
            for variant in ("gptq_mixed", "fq_budget"):
                records.append(make_record(model, [f"variant={variant}{budget}"], {"top1": base + float(budget)},
                                           bits_per_weight=float(budget), nominal_bits=float(budget)))
    assert {_series(r) for r in records} == {"framequant", "framequant (auto clip)", "framequant (budget)", "gptq",
                                             "gptq (mixed precision)"}
    paths = write_figures(records, tmp_path)
    assert [p.name for p in paths] == [f"{name}.png" for name in FIGURES]
    assert all(p.stat().st_size > 10_000 for p in paths)
    empty = write_figures([], tmp_path / "empty")
    assert all(p.stat().st_size > 5_000 for p in empty)  # a figure that says what to run


def test_sizes_table_reads_the_packed_checkpoint_sizes(tmp_path, make_record):
    packed = {"bytes": 2.31e9, "fp16_bytes": 13.5e9, "bits_per_weight": 2.56}
    write(tmp_path, "a", make_record("llama2_7b", ["variant=fq_w2_r1.1", "save=true"], {"wikitext2_ppl": 14.9},
                                     packed=packed))
    write(tmp_path, "b", make_record("llama2_13b", ["variant=gptq_w2", "save=true"], {"wikitext2_ppl": 1e3},
                                     packed={"bytes": 3.6e9, "fp16_bytes": 26.0e9, "bits_per_weight": 2.02}))
    write(tmp_path, "c", make_record("llama2_13b", ["variant=fq_w2_r1.0"], {"wikitext2_ppl": 9.0}))  # not saved
    table = build(TABLES["table6"], finished_records(tmp_path))
    assert table.cell("fp16", "llama2_7b").ours == pytest.approx(13.5)
    assert table.cell("fq_w2_r1.1:packed_gb", "llama2_7b").ours == pytest.approx(2.31)
    assert table.cell("fq_w2_r1.1:packed_bits", "llama2_7b").ours == pytest.approx(2.56)
    assert table.cell("gptq_w2:packed_gb", "llama2_13b").ours == pytest.approx(3.6)
    assert table.cell("fq_w2_r1.0:packed_gb", "llama2_13b").ours is None
    assert table.cell("fq_w2_r1.1:packed_gb", "llama2_7b").paper is None  # the paper's text lost these numbers
    assert "| FrameQuant (r = 1.1) | 2.2 | 2.31 / – |  |" in to_markdown(table)


def test_a_full_precision_cell_far_from_the_paper_is_flagged(tmp_path, make_record):
    """The paper's Llama-2-7B WikiText-2 FP is 5.68; the usual context-2048 figure is 5.47: 3.7% apart, within
    tolerance. A tokenizer that changes the token count by 9% is flagged, with the reason under the table."""
    write(tmp_path, "a", make_record("llama2_7b", ["variant=fp"], {"wikitext2_ppl": 5.47}))
    write(tmp_path, "b", make_record("opt_125m", ["variant=fp"], {"wikitext2_ppl": 30.5}))
    table = build(TABLES["table5"], finished_records(tmp_path))
    assert not table.cell("fp", "llama2_7b").flagged
    far = table.cell("fp", "opt_125m")  # 30.5 against the paper's 27.65: 10% away
    assert far.flagged and far.paper.value == 27.65
    markdown = to_markdown(table)
    assert "30.50 / 27.65 (+2.85) ⚠" in markdown and "different tokenizer" in markdown
    quantized_far = build(TABLES["table5"], finished_records(tmp_path)).cell("gptq_w2", "llama2_7b")
    assert not quantized_far.flagged  # only full-precision rows measure the setup
