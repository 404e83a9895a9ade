"""The data layer (`hf_slimmoe.utils.data`): text / jsonl / save_to_disk into token rows, teacher columns, padding."""

import json
import logging

import pytest
import torch
from datasets import Dataset, DatasetDict

from hf_slimmoe.cli import main as slimmoe_main
from hf_slimmoe.compression.recipe import DataSource
from hf_slimmoe.compression.sources import load_eval_data, read_source
from hf_slimmoe.posttrain import build_tiny_tokenizer
from hf_slimmoe.utils.data import (
    TokenCollator,
    batches,
    collate_tokens,
    load_calibration_batches,
    load_dataset_splits,
    load_token_dataset,
    pack,
    read_texts,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


# ------------------------------------------------------------------------------------------------- text files
def test_text_and_jsonl_examples(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"first line\r\n\n  \nsecond line\rthird\n")
    assert read_texts(str(tmp_path / "a.txt")) == ["first line", "second line", "third"]
    (tmp_path / "a.jsonl").write_text('{"body": "x y"}\n\n{"body": "z"}\n')
    assert read_texts(str(tmp_path / "a.jsonl"), "body") == ["x y", "z"]
    with pytest.raises(ValueError, match=r"a\.jsonl:1 has no 'text' field \(fields: \['body'\]\)"):
        read_texts(str(tmp_path / "a.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 is not a JSON object"):
        read_texts(str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize("content, message", [
    (b"some text\x00\x01\x02 more", r"garbage\.txt is not text \(a NUL byte at offset 9\)"),
    (bytes(range(128, 256)) * 4 + b"\nabc\n", r"garbage\.txt is not text: 512 of its 517 bytes are not UTF-8"),
    (b"", r"garbage\.txt holds no text"),
    (b"\n  \n\n", r"garbage\.txt holds no text"),
])
def test_not_text_and_empty_files_are_refused_naming_the_file(tmp_path, tokenizer, content, message):
    path = tmp_path / "garbage.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_texts(str(path))
    with pytest.raises(ValueError, match=message):
        load_token_dataset(str(path), tokenizer)
    with pytest.raises(ValueError, match=message):
        load_calibration_batches(str(path), tokenizer_path=None)


def test_a_few_undecodable_bytes_are_replaced_with_a_warning(tmp_path, caplog):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 ".encode("latin-1") + b"plain ascii text " * 10)
    with caplog.at_level(logging.WARNING, logger="hf_slimmoe.utils.data"):
        assert read_texts(str(path)) == ["caf\ufffd " + "plain ascii text " * 10]
    assert "latin1.txt: 1 bytes are not UTF-8" in caplog.text


def test_binary_text_files_in_a_recipe_source_are_refused(tmp_path):
    (tmp_path / "good.py").write_text("x = 1\n")
    (tmp_path / "model.bin").write_bytes(b"\x00\x01" * 64)
    with pytest.raises(ValueError, match=r"model\.bin is not text"):
        read_source(DataSource(glob=str(tmp_path / "*")), "data.train", None)


# --------------------------------------------------------------------------------------------------- datasets
def test_dataset_dict_split_rules(tmp_path):
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3]]})
    DatasetDict({"train": rows, "test": Dataset.from_dict({"input_ids": [[4, 5]]})}).save_to_disk(tmp_path / "both")
    DatasetDict({"validation": rows}).save_to_disk(tmp_path / "one")
    DatasetDict({"a": rows, "b": rows}).save_to_disk(tmp_path / "two")
    assert load_token_dataset(str(tmp_path / "both"))["input_ids"] == [[1, 2, 3]]  # "train" by default
    assert load_token_dataset(str(tmp_path / "both"), split="test")["input_ids"] == [[4, 5]]
    assert load_token_dataset(str(tmp_path / "one"))["input_ids"] == [[1, 2, 3]]  # the only split
    with pytest.raises(ValueError, match=r"two holds the splits \['a', 'b'\] but no 'train' split"):
        load_token_dataset(str(tmp_path / "two"))
    with pytest.raises(ValueError, match=r"no 'test' split"):
        load_token_dataset(str(tmp_path / "one"), split="test")
    assert set(load_dataset_splits(str(tmp_path / "both"))) == {"train", "test"}
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n')
    assert list(load_dataset_splits(str(tmp_path / "rows.jsonl"), split="mine")) == ["mine"]


def test_tokenized_rows_are_kept_and_text_rows_under_two_tokens_are_dropped(tmp_path, tokenizer):
    cached = Dataset.from_dict({"input_ids": [[7], [1, 2]], "teacher_topk_ids": [[[3]], [[4], [5]]]})
    cached.save_to_disk(tmp_path / "cached")
    assert load_token_dataset(str(tmp_path / "cached")).to_dict() == cached.to_dict()  # row for row, no tokenizer
    Dataset.from_dict({"body": ["def f(x): return x", "x"]}).save_to_disk(tmp_path / "text")
    one_token = tokenizer("x")["input_ids"]
    assert len(one_token) == 1
    rows = load_token_dataset(str(tmp_path / "text"), tokenizer, text_column="body", max_length=4)
    assert rows["input_ids"] == [tokenizer("def f(x): return x")["input_ids"][:4]]
    with pytest.raises(ValueError, match="holds text: a tokenizer is needed"):
        load_token_dataset(str(tmp_path / "text"), None, text_column="body")
    (tmp_path / "short.txt").write_text("x\n")
    with pytest.raises(ValueError, match=r"short\.txt gives no example of at least two tokens"):
        load_token_dataset(str(tmp_path / "short.txt"), tokenizer)


# -------------------------------------------------------------------------------------------------- collation
def test_collate_pads_rows_labels_and_every_teacher_column():
    rows = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "teacher_topk_ids": [[1, 2], [3, 4], [5, 6]],
         "teacher_topk_logprobs": [[-0.5, -1.0]] * 3, "teacher_sample_ids": [[9], [8], [7]],
         "teacher_topk_fingerprint": "abc"},
        {"input_ids": [8], "labels": [8], "teacher_topk_ids": [[1, 1]], "teacher_topk_logprobs": [[-0.1, -2.0]],
         "teacher_sample_ids": [[4]], "teacher_topk_fingerprint": "def"},
    ]
    batch = collate_tokens(rows, pad_token_id=1)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "teacher_topk_ids", "teacher_topk_logprobs",
                          "teacher_sample_ids"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["teacher_topk_ids"].dtype == torch.long and batch["teacher_topk_logprobs"].dtype == torch.float32
    assert batch["teacher_topk_ids"].tolist() == [[[1, 2], [3, 4], [5, 6]], [[1, 1], [0, 0], [0, 0]]]
    assert batch["teacher_sample_ids"].tolist() == [[[9], [8], [7]], [[4], [0], [0]]]
    no_labels = TokenCollator(pad_token_id=0, labels=False)([{"input_ids": [3]}])
    assert set(no_labels) == {"input_ids", "attention_mask"} and no_labels["input_ids"].tolist() == [[3]]
    assert collate_tokens([{"input_ids": [3, 4]}, {"input_ids": [5]}])["labels"].tolist() == [[3, 4], [5, -100]]


def test_calibration_batches_truncate_teacher_columns_with_their_rows(tmp_path):
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3, 4], [5, 6], [7, 8, 9]],
                              "teacher_topk_ids": [[[i, i]] * n for i, n in ((1, 4), (2, 2), (3, 3))],
                              "teacher_topk_logprobs": [[[-1.0, -2.0]] * n for n in (4, 2, 3)],
                              "teacher_topk_fingerprint": ["a", "b", "c"]})
    rows.save_to_disk(tmp_path / "cache")
    result = load_calibration_batches(str(tmp_path / "cache"), max_length=3, num_examples=2, batch_size=2)
    assert len(result) == 1 and set(result[0]) == {"input_ids", "attention_mask", "teacher_topk_ids",
                                                   "teacher_topk_logprobs"}
    assert result[0]["input_ids"].tolist() == [[1, 2, 3], [5, 6, 0]]
    assert result[0]["teacher_topk_ids"].shape == (2, 3, 2) and result[0]["teacher_topk_ids"][1, 2].tolist() == [0, 0]
    assert [b["input_ids"].shape[0] for b in batches(rows, 2)] == [2, 1]


# ------------------------------------------------------------------------------------------------ block sizes
def test_block_size_zero_and_empty_text_are_clear_errors(tmp_path, tokenizer, capsys):
    documents = Dataset.from_dict({"text": ["abc def"]})
    with pytest.raises(ValueError, match="block_size=0 must be at least 1 token"):
        pack(documents, tokenizer, 0, "text")
    (tmp_path / "held_out.py").write_text("x = 1\n" * 100)
    with pytest.raises(ValueError, match="--block-size 0: block_size must be at least 1 token"):
        load_eval_data(tokenizer, str(tmp_path / "held_out.py"), block_size=0)
    (tmp_path / "empty.txt").write_text("")
    assert slimmoe_main(["cache-teacher", str(tmp_path / "no-teacher"), str(tmp_path / "empty.txt"),
                         str(tmp_path / "out")]) == 2
    assert "empty.txt holds no text" in capsys.readouterr().err
    assert len(load_eval_data(tokenizer, str(tmp_path / "held_out.py"), block_size=8, max_blocks=3)) == 3
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "x = 1\n" * 50}) + "\n")
    assert len(load_eval_data(tokenizer, str(tmp_path / "rows.jsonl"), block_size=8)["input_ids"][0]) == 8
