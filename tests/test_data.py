import json

import pytest

from tether.data import DataError, PromptSampler, load_prompt_rows


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = [{"prompt": "What is 2+2?", "answer": "4"}, {"prompt": "Name a colour.", "answer": "red"}]


# ---------------------------------------------------------------------------------------------------- formats


def test_jsonl_keeps_other_columns(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps(r) for r in GOOD])
    data = load_prompt_rows(path)
    assert data.rows == GOOD
    assert data.skipped == []
    assert data.source == str(path)


def test_json_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(GOOD))
    assert load_prompt_rows(path).rows == GOOD


def test_json_must_be_a_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"data": GOOD}))
    with pytest.raises(DataError, match="list of objects"):
        load_prompt_rows(path)


def test_json_that_is_really_jsonl_gets_a_hint(tmp_path):
    path = write_jsonl(tmp_path / "p.json", [json.dumps(r) for r in GOOD])
    with pytest.raises(DataError, match=r"\.jsonl"):
        load_prompt_rows(path)


def test_csv_with_bom_and_custom_prompt_column(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('\ufeffquestion,answer\n"What is 2+2, really?",4\nName a colour.,red\n', encoding="utf-8")
    data = load_prompt_rows(path, prompt_column="question")
    assert data.rows == [{"answer": "4", "prompt": "What is 2+2, really?"}, {"answer": "red", "prompt": "Name a colour."}]


def test_csv_row_with_wrong_field_count_is_malformed(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,answer\nfine,1\ntoo,many,fields\n")
    data = load_prompt_rows(path)
    assert [r["prompt"] for r in data.rows] == ["fine"]
    assert data.skipped == [(2, "malformed row: 3 fields but the header has 2")]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(GOOD + [{"prompt": None, "answer": "x"}]), path)
    data = load_prompt_rows(path)
    assert data.rows == GOOD
    assert data.skipped == [(3, "prompt column 'prompt' is null")]


def test_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(GOOD)
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_prompt_rows(tmp_path / "ds").rows == GOOD

    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert load_prompt_rows(tmp_path / "dd").rows == GOOD

    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(DataError, match="'train' split"):
        load_prompt_rows(tmp_path / "no_train")


def test_directory_that_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="save_to_disk"):
        load_prompt_rows(tmp_path)


def test_unknown_extension_lists_supported_formats(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match=r"unsupported data format '\.txt'.*\.jsonl.*\.parquet"):
        load_prompt_rows(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_prompt_rows(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------------- bad rows


BAD_JSONL = [
    json.dumps({"prompt": "ok 1"}),  # line 1
    "{not json",  # line 2
    "[1, 2]",  # line 3
    "",  # line 4: blank, ignored
    json.dumps({"question": "no prompt key"}),  # line 5
    json.dumps({"prompt": "   "}),  # line 6
    json.dumps({"prompt": ""}),  # line 7
    json.dumps({"prompt": 42}),  # line 8
    json.dumps({"prompt": "this prompt is far too long for the limit"}),  # line 9
    json.dumps({"prompt": "ok 2"}),  # line 10
]


def count_words(text):
    return len(text.split())


def test_bad_rows_are_skipped_with_line_numbers_and_reasons(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", BAD_JSONL)
    data = load_prompt_rows(path, max_prompt_tokens=5, count_tokens=count_words)
    assert [r["prompt"] for r in data.rows] == ["ok 1", "ok 2"]
    numbers = [n for n, _ in data.skipped]
    assert numbers == [2, 3, 5, 6, 7, 8, 9]
    reasons = dict(data.skipped)
    assert "not valid JSON" in reasons[2]
    assert "expected a JSON object, got list" in reasons[3]
    assert "missing prompt column 'prompt'" in reasons[5]
    assert reasons[6] == "prompt is only whitespace"
    assert reasons[7] == "empty prompt"
    assert "int, not a string" in reasons[8]
    assert "9 tokens, longer than max_prompt_tokens=5" in reasons[9]
    summary = data.skipped_summary(max_examples=2)
    assert "skipped 7 of 9 rows" in summary and "row 2:" in summary and "and 5 more" in summary


def test_on_bad_row_error_names_file_row_and_reason(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", BAD_JSONL)
    with pytest.raises(DataError, match=r"p\.jsonl: row 2: malformed row: not valid JSON"):
        load_prompt_rows(path, on_bad_row="error")


def test_all_rows_bad_is_an_error_that_names_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"question": "q", "answer": "a"})] * 3)
    with pytest.raises(DataError, match=r"all 3 rows are unusable \(there is no 'prompt' column; columns: answer, question\)"):
        load_prompt_rows(path)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_prompt_rows(path)


def test_prompt_column_clash_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"question": "q", "prompt": "something else"})])
    with pytest.raises(DataError, match="both the prompt column 'question' and a separate 'prompt' column"):
        load_prompt_rows(path, prompt_column="question")


def test_argument_checks(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps(r) for r in GOOD])
    with pytest.raises(ValueError, match="on_bad_row"):
        load_prompt_rows(path, on_bad_row="ignore")
    with pytest.raises(ValueError, match="count_tokens"):
        load_prompt_rows(path, max_prompt_tokens=10)


# ---------------------------------------------------------------------------------------------------- sampler


ROWS = [{"prompt": f"p{i}"} for i in range(7)]


def draw(sampler, n):
    return [[r["prompt"] for r in sampler.next_batch()] for _ in range(n)]


def test_sampler_covers_each_epoch_and_spans_boundaries():
    sampler = PromptSampler(ROWS, batch_size=3, seed=0)
    batches = draw(sampler, 7)  # 21 rows = exactly 3 epochs
    flat = [p for b in batches for p in b]
    for epoch in range(3):
        assert sorted(flat[epoch * 7 : (epoch + 1) * 7]) == sorted(r["prompt"] for r in ROWS)
    assert all(len(b) == 3 for b in batches)
    # Each epoch is shuffled differently (seed + epoch), and the run is deterministic.
    assert flat[0:7] != flat[7:14]
    assert draw(PromptSampler(ROWS, batch_size=3, seed=0), 7) == batches
    assert draw(PromptSampler(ROWS, batch_size=3, seed=1), 7) != batches


def test_sampler_without_shuffle_is_in_file_order():
    sampler = PromptSampler(ROWS, batch_size=4, seed=0, shuffle=False)
    assert draw(sampler, 2) == [["p0", "p1", "p2", "p3"], ["p4", "p5", "p6", "p0"]]


def test_sampler_resume_draws_the_same_batches():
    uninterrupted = PromptSampler(ROWS, batch_size=3, seed=5)
    expected = draw(uninterrupted, 10)

    first = PromptSampler(ROWS, batch_size=3, seed=5)
    before = draw(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # it must survive trainer_state.json
    resumed = PromptSampler(ROWS, batch_size=3, seed=5)
    resumed.load_state_dict(state)
    assert before + draw(resumed, 6) == expected


def test_sampler_rejects_state_from_different_data():
    state = PromptSampler(ROWS, batch_size=2, seed=0).state_dict()
    with pytest.raises(ValueError, match="saved for 7 rows but this dataset has 6"):
        PromptSampler(ROWS[:6], batch_size=2, seed=0).load_state_dict(state)


def test_sampler_argument_checks():
    with pytest.raises(ValueError, match="at least one row"):
        PromptSampler([], batch_size=2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(ROWS, batch_size=0, seed=0)
