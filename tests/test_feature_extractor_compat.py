"""FbankExtractor as a stand-in for transformers' SeamlessM4TFeatureExtractor: every call option, constructor
setting, input form and return type against transformers on the same inputs (values ≤ FBANK_ATOL, masks, types,
dtypes and shapes equal), ``pad``, preprocessor_config.json both ways, and a Wav2Vec2BertProcessor with ours in it.
CPU only; nothing is downloaded.
"""

import copy
import json
import pickle

import numpy as np
import pytest
import torch
from conftest import FBANK_ATOL

from w2vbert_fast import FbankExtractor
from w2vbert_fast.features import FeatureBatch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # its "pass sampling_rate" warning, for the calls that test None
RATE = 16000


def clip(samples, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / RATE
    x = 0.4 * np.sin(2 * np.pi * (150 * t + 2000 * t ** 2)) + 0.1 * rng.standard_normal(samples)
    return x.astype(np.float32)


# 99, 29 and 56 frames: odd and even counts, so every padding and stride remainder is exercised
CLIPS = [clip(16161, 0), clip(5000, 1), clip(9200, 2)]


def assert_same_batch(ours, theirs):
    """Same keys, the same container type, dtype and shape per key; features within FBANK_ATOL, the rest equal."""
    assert isinstance(ours, FeatureBatch)
    assert sorted(ours.keys()) == sorted(theirs.keys())
    for key, expected in theirs.items():
        actual = ours[key]
        assert type(actual) is type(expected), f"{key}: {type(actual).__name__} vs {type(expected).__name__}"
        assert actual.dtype == expected.dtype and tuple(actual.shape) == tuple(expected.shape), (
            f"{key}: {actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {tuple(expected.shape)}")
        actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
        if key == "input_features":
            assert np.isfinite(actual).all()
            diff = np.abs(actual - expected).max() if actual.size else 0.0
            assert diff <= FBANK_ATOL, f"max |diff| {diff:.3e} > {FBANK_ATOL}"
        else:
            assert np.array_equal(actual, expected), key


def both(settings=None):
    settings = settings or {}
    return FbankExtractor(**settings), transformers.SeamlessM4TFeatureExtractor(**settings)


# ------------------------------------------------------------------------------------------- call options
CALL_OPTIONS = {
    "defaults": {},
    "longest": dict(padding="longest"),
    "no-multiple": dict(pad_to_multiple_of=None),
    "multiple-4": dict(pad_to_multiple_of=4),
    "multiple-3": dict(pad_to_multiple_of=3),
    "max-length": dict(padding="max_length", max_length=120),
    "max-length-odd-no-multiple": dict(padding="max_length", max_length=101, pad_to_multiple_of=None),
    "max-length-truncated": dict(padding="max_length", max_length=60, truncation=True),
    "longest-truncated": dict(padding="longest", max_length=30, truncation=True),
    "truncated-to-multiple": dict(max_length=31, truncation=True, pad_to_multiple_of=4),
    "no-mask": dict(return_attention_mask=False),
    "mask": dict(return_attention_mask=True),
    "normalised": dict(do_normalize_per_mel_bins=True),
    "unnormalised": dict(do_normalize_per_mel_bins=False),
    "unnormalised-none": dict(do_normalize_per_mel_bins=None),
    "unnormalised-longest-multiple-3": dict(do_normalize_per_mel_bins=False, padding="longest", pad_to_multiple_of=3),
}


@pytest.mark.parametrize("options", CALL_OPTIONS.values(), ids=CALL_OPTIONS.keys())
def test_call_options_match_transformers(options):
    ours, theirs = both()
    assert_same_batch(ours(CLIPS, sampling_rate=RATE, return_tensors="np", **options),
                      theirs(CLIPS, sampling_rate=RATE, return_tensors="np", **options))


@pytest.mark.parametrize("padding", [False, "do_not_pad"])
def test_no_padding_matches_transformers_where_it_gives_a_batch(padding):
    ours, theirs = both()
    same_length = [CLIPS[0], clip(16161, 5)]
    assert_same_batch(ours(same_length, sampling_rate=RATE, padding=padding, return_tensors="np"),
                      theirs(same_length, sampling_rate=RATE, padding=padding, return_tensors="np"))
    # truncation makes clips of different lengths equal
    kwargs = dict(sampling_rate=RATE, padding=padding, max_length=24, truncation=True, return_tensors="np")
    assert_same_batch(ours(CLIPS, **kwargs), theirs(CLIPS, **kwargs))


SETTINGS = {
    "stride-3": dict(stride=3),
    "w2v-bert-2.0-padding-value": dict(padding_value=1),
    "left": dict(padding_side="left"),
    "left-stride-3-negative-padding": dict(padding_side="left", stride=3, padding_value=-2.0),
    "no-mask-by-default": dict(return_attention_mask=False),
}


@pytest.mark.parametrize("options", [{}, dict(padding="max_length", max_length=111),
                                     dict(max_length=40, truncation=True)], ids=["longest", "max-length", "truncated"])
@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_constructor_settings_match_transformers(settings, options):
    ours, theirs = both(settings)
    assert_same_batch(ours(CLIPS, sampling_rate=RATE, return_tensors="pt", **options),
                      theirs(CLIPS, sampling_rate=RATE, return_tensors="pt", **options))


def test_stride_1_gives_the_frame_mask_where_transformers_gives_an_empty_one():
    ours, theirs = both(dict(stride=1))
    mine = ours(CLIPS, sampling_rate=RATE, return_tensors="np")
    expected = theirs(CLIPS, sampling_rate=RATE, return_tensors="np")
    assert expected["attention_mask"].shape == (3, 0)  # the documented difference: transformers' mask is empty
    assert mine["input_features"].shape == expected["input_features"].shape == (3, 100, 80)
    assert np.abs(mine["input_features"] - expected["input_features"]).max() <= FBANK_ATOL
    assert mine["attention_mask"].sum(1).tolist() == [99, 29, 56]


# ------------------------------------------------------------------------------------------- return types
@pytest.mark.parametrize("return_tensors", ["pt", "np", None, transformers.TensorType.PYTORCH,
                                            transformers.TensorType.NUMPY],
                         ids=["pt", "np", "None", "pt-enum", "np-enum"])
def test_return_types_match_transformers(return_tensors):
    ours, theirs = both()
    assert_same_batch(ours(CLIPS, sampling_rate=RATE, return_tensors=return_tensors),
                      theirs(CLIPS, sampling_rate=RATE, return_tensors=return_tensors))


def test_return_tensors_left_out_gives_torch_tensors_and_sampling_rate_none_assumes_16k():
    ours, theirs = both()
    assert_same_batch(ours(CLIPS), theirs(CLIPS, sampling_rate=None, return_tensors="pt"))


def test_the_batch_is_a_dict_with_attribute_access_and_to():
    batch = FbankExtractor()(CLIPS, sampling_rate=RATE, return_tensors="pt")
    assert isinstance(batch, dict) and batch.input_features is batch["input_features"]
    with pytest.raises(AttributeError):
        batch.labels
    assert batch.to(torch.float64) is batch
    assert batch["input_features"].dtype == torch.float64 and batch["attention_mask"].dtype == torch.int32
    batch.to("cpu", non_blocking=True)
    assert batch["attention_mask"].device.type == "cpu"
    for copied in (copy.deepcopy(batch), pickle.loads(pickle.dumps(batch))):
        assert isinstance(copied, FeatureBatch) and torch.equal(copied["input_features"], batch["input_features"])
    batch["labels"] = torch.tensor([1, 2])  # what a processor adds
    assert batch.labels.tolist() == [1, 2]
    with pytest.raises(ValueError, match="a device or a dtype"):
        batch.to([1])


# ------------------------------------------------------------------------------------- input forms, channels
STEREO = np.stack([CLIPS[1], clip(5000, 7)])  # (channels, samples): channel 0 differs from channel 1
INPUT_FORMS = {
    "list-of-floats": CLIPS[0].tolist(),
    "1d-tensor": torch.from_numpy(CLIPS[0]),
    "list-of-tensors": [torch.from_numpy(c) for c in CLIPS],
    "list-of-lists": [c.tolist() for c in CLIPS],
    "tuple-of-arrays": tuple(CLIPS),
    "float64": [c.astype(np.float64) for c in CLIPS],
    "2d-array-is-a-batch": STEREO,
    "2d-tensor-is-one-clip-channel-0": torch.from_numpy(STEREO),
    "3d-array-is-a-batch-of-channel-0s": np.stack([STEREO, STEREO[::-1]]),
    "list-of-2d-arrays": [STEREO, CLIPS[0][None]],
    "list-of-2d-tensors": [torch.from_numpy(STEREO)],
    "list-of-2d-lists": [STEREO.tolist()],
}


@pytest.mark.parametrize("raw_speech", INPUT_FORMS.values(), ids=INPUT_FORMS.keys())
def test_input_forms_and_channels_match_transformers(raw_speech):
    ours, theirs = both()
    assert_same_batch(ours(raw_speech, sampling_rate=RATE, return_tensors="np"),
                      theirs(raw_speech, sampling_rate=RATE, return_tensors="np"))


def test_a_channels_first_clip_gives_channel_0():
    fe = FbankExtractor()
    stereo = fe(torch.from_numpy(STEREO))
    assert stereo["input_features"].shape[0] == 1
    assert torch.equal(stereo["input_features"], fe(STEREO[0])["input_features"])
    assert not torch.equal(stereo["input_features"], fe(STEREO[1])["input_features"])


def test_a_padded_tensor_with_lengths_stays_a_batch():
    padded = torch.zeros(2, 9200)
    padded[0], padded[1, :5000] = torch.from_numpy(CLIPS[2]), torch.from_numpy(CLIPS[1])
    ours = FbankExtractor()(padded, lengths=torch.tensor([9200, 5000]), return_tensors="np")
    assert_same_batch(ours, transformers.SeamlessM4TFeatureExtractor()([CLIPS[2], CLIPS[1]], sampling_rate=RATE,
                                                                       return_tensors="np"))


# ---------------------------------------------------------------------------------------------------- pad
def stored_features(extractor, clips):
    """What a dataset holds after mapping the extractor over single clips: one (frames, 160) array each."""
    return [{"input_features": extractor(c, sampling_rate=RATE, return_tensors="np")["input_features"][0]}
            for c in clips]


PAD_OPTIONS = {
    "defaults-np": {},
    "pt": dict(return_tensors="pt"),
    "multiple-8": dict(pad_to_multiple_of=8, return_tensors="np"),
    "max-length": dict(padding="max_length", max_length=64, return_tensors="pt"),
    "truncated": dict(max_length=20, truncation=True, return_tensors="np"),
    "no-mask": dict(return_attention_mask=False, return_tensors="np"),
}


@pytest.mark.parametrize("options", PAD_OPTIONS.values(), ids=PAD_OPTIONS.keys())
@pytest.mark.parametrize("settings", [{}, dict(padding_side="left", padding_value=1)], ids=["right", "left"])
def test_pad_matches_transformers(settings, options):
    ours, theirs = both(settings)
    assert_same_batch(ours.pad(stored_features(ours, CLIPS), **options),
                      theirs.pad(stored_features(theirs, CLIPS), **options))


def test_pad_of_tensors_and_given_masks_matches_transformers():
    ours, theirs = both()
    examples = [{"input_features": torch.from_numpy(e["input_features"]),
                 "attention_mask": torch.ones(len(e["input_features"]), dtype=torch.int32)}
                for e in stored_features(theirs, CLIPS)]
    assert_same_batch(ours.pad(examples), theirs.pad(examples))  # tensors in, tensors out
    columns = {"input_features": [e["input_features"].tolist() for e in examples]}  # a mapping of lists
    assert_same_batch(ours.pad(columns, return_tensors="np"), theirs.pad(columns, return_tensors="np"))


# ------------------------------------------------------------------------------------ preprocessor_config
SAVED_SETTINGS = dict(padding_value=1, stride=3, padding_side="left", return_attention_mask=False)


def test_a_folder_saved_by_transformers_loads_with_the_same_settings(tmp_path):
    theirs = transformers.SeamlessM4TFeatureExtractor(**SAVED_SETTINGS, an_unknown_key=[1, 2])
    theirs.save_pretrained(tmp_path)
    ours = FbankExtractor.from_pretrained(tmp_path)
    assert ours.to_dict() == theirs.to_dict()
    assert ours.to_json_string() == theirs.to_json_string()
    assert_same_batch(ours(CLIPS, return_tensors="np"), theirs(CLIPS, sampling_rate=RATE, return_tensors="np"))
    # the JSON file itself, and overrides
    assert FbankExtractor.from_pretrained(tmp_path / "preprocessor_config.json").to_dict() == theirs.to_dict()
    assert FbankExtractor.from_pretrained(tmp_path, stride=2).stride == 2


def test_a_folder_saved_by_us_loads_into_transformers_with_the_same_settings(tmp_path):
    ours = FbankExtractor(**SAVED_SETTINGS, an_unknown_key="kept")
    assert ours.save_pretrained(tmp_path) == [str(tmp_path / "preprocessor_config.json")]
    for loader in (transformers.SeamlessM4TFeatureExtractor, transformers.AutoFeatureExtractor):
        theirs = loader.from_pretrained(tmp_path)
        assert type(theirs) is transformers.SeamlessM4TFeatureExtractor
        assert theirs.to_dict() == ours.to_dict() and theirs.to_json_string() == ours.to_json_string()
    assert_same_batch(ours(CLIPS, return_tensors="pt"), theirs(CLIPS, sampling_rate=RATE, return_tensors="pt"))
    assert FbankExtractor.from_pretrained(tmp_path).to_dict() == ours.to_dict()


def test_the_hub_config_of_w2v_bert_2_0_loads_alike(tmp_path):
    """facebook/w2v-bert-2.0's preprocessor_config.json (written by transformers 4, with processor_class)."""
    hub = {"feature_extractor_type": "SeamlessM4TFeatureExtractor", "feature_size": 80, "num_mel_bins": 80,
           "padding_side": "right", "padding_value": 1, "processor_class": "Wav2Vec2BertProcessor",
           "return_attention_mask": True, "sampling_rate": 16000, "stride": 2}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hub))
    ours = FbankExtractor.from_pretrained(tmp_path)
    theirs = transformers.SeamlessM4TFeatureExtractor.from_pretrained(tmp_path)
    assert ours.to_dict() == theirs.to_dict() and "processor_class" not in ours.to_dict()
    assert_same_batch(ours(CLIPS, return_tensors="np"), theirs(CLIPS, sampling_rate=RATE, return_tensors="np"))


def test_a_processor_folder_of_transformers_5_loads_its_nested_settings(tmp_path):
    processor = transformers.Wav2Vec2BertProcessor(
        feature_extractor=transformers.SeamlessM4TFeatureExtractor(padding_value=1, stride=3),
        tokenizer=tiny_tokenizer(tmp_path / "vocab"))
    processor.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "preprocessor_config.json").exists()  # it nests the settings instead
    assert FbankExtractor.from_pretrained(tmp_path / "saved").to_dict() == processor.feature_extractor.to_dict()


def test_settings_that_cannot_be_honoured_are_refused(tmp_path):
    whisper = {"feature_extractor_type": "WhisperFeatureExtractor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(whisper))
    with pytest.raises(ValueError, match="feature_extractor_type is 'WhisperFeatureExtractor'"):
        FbankExtractor.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="cache_dir"):
        FbankExtractor.from_pretrained(tmp_path, cache_dir="/tmp")
    with pytest.raises(ValueError, match="padding_side"):
        FbankExtractor(padding_side="middle")
    with pytest.raises(ValueError, match="padding_value"):
        FbankExtractor(padding_value=None)
    with pytest.raises(ValueError, match="feature_size"):
        FbankExtractor(feature_size=128)


# -------------------------------------------------------------------------------------- documented refusals
@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda fe: fe(CLIPS, return_tensors="tf"), ValueError, "return_tensors must be"),
        (lambda fe: fe(CLIPS, padding="max_length"), ValueError, "padding='max_length' needs max_length"),
        (lambda fe: fe(CLIPS, truncation=True), ValueError, "truncation=True needs max_length"),
        (lambda fe: fe(CLIPS, padding="max_length", max_length=50), ValueError, r"clip\(s\) \[0, 2\] have more"),
        (lambda fe: fe(CLIPS, max_length=0, truncation=True), ValueError, "max_length must be a positive int"),
        (lambda fe: fe(CLIPS, True), TypeError, "positional"),
        (lambda fe: fe(np.zeros((1, 2, 2, 4000), np.float32)), ValueError, r"\(batch, channels, samples\)"),
        (lambda fe: fe(torch.zeros(1, 2, 4000)), ValueError, "lengths="),
        (lambda fe: fe([STEREO.T]), ValueError, r"clip 0 \(channel 0 of 5000\) has 2 samples"),
        (lambda fe: fe.pad([{"input_features": np.zeros((3, 160))}, {"input_features": np.zeros((4, 160))}],
                           padding=False), ValueError, "padding=False needs every example"),
        (lambda fe: fe.pad([{"input_features": np.zeros((3, 160)), "labels": [1]}]), ValueError, "labels"),
        (lambda fe: fe.pad([]), ValueError, "non-empty list"),
        (lambda fe: fe.pad({"input_features": [np.zeros((3, 160)), np.zeros((3, 80))]}), ValueError,
         r"example 1 must be \(frames, 160\)"),
    ],
    ids=["tensorflow", "max-length-without-length", "truncation-without-length",
         "longer-than-max-length", "zero-max-length", "positional-option", "4d-array", "3d-tensor",
         "samples-first-stereo", "pad-ragged-without-padding", "pad-other-keys", "pad-nothing", "pad-mixed-widths"],
)
def test_what_transformers_does_differently_is_refused_with_a_named_error(call, error, message):
    with pytest.raises(error, match=message):
        call(FbankExtractor())


# ----------------------------------------------------------------------------------------------- processor
def tiny_tokenizer(folder):
    folder.mkdir()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "a": 5, "b": 6, "c": 7, "d": 8}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return transformers.Wav2Vec2CTCTokenizer(str(folder / "vocab.json"))


def test_ours_inside_a_wav2vec2_bert_processor_gives_the_same_batch(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "vocab")
    reference = transformers.Wav2Vec2BertProcessor(
        feature_extractor=transformers.SeamlessM4TFeatureExtractor(padding_value=1), tokenizer=tokenizer)
    reference.save_pretrained(tmp_path / "processor")
    # the constructor checks for transformers' FeatureExtractionMixin: build with theirs, then swap ours in
    swapped = transformers.Wav2Vec2BertProcessor.from_pretrained(tmp_path / "processor")
    swapped.feature_extractor = FbankExtractor.from_pretrained(tmp_path / "processor")
    texts = ["abc", "a b", "dcd"]  # the same token count: the tokenizer pads only when asked

    for kwargs in (dict(return_tensors="pt"), dict(return_tensors="np", padding="max_length", max_length=120),
                   dict(return_tensors="pt", pad_to_multiple_of=8)):
        ours = swapped(audio=CLIPS, text=texts, sampling_rate=RATE, **kwargs)
        expected = reference(audio=CLIPS, text=texts, sampling_rate=RATE, **kwargs)
        assert_same_batch(ours, expected)  # input_features, attention_mask and labels

    # a CTC data collator: features stored per clip, then processor.pad with the labels
    labels = [{"input_ids": tokenizer(t)["input_ids"]} for t in texts]
    ours = swapped.pad(input_features=stored_features(swapped, CLIPS), labels=labels, padding=True,
                       return_tensors="pt")
    expected = reference.pad(input_features=stored_features(reference, CLIPS), labels=labels, padding=True,
                             return_tensors="pt")
    assert_same_batch(ours, expected)
    assert swapped.model_input_names == reference.model_input_names


def tiny_model(head):
    config = transformers.Wav2Vec2BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, output_hidden_size=32,
        vocab_size=9, conv_depthwise_kernel_size=3, feature_projection_input_dim=160, pad_token_id=0)
    torch.manual_seed(0)
    return head(config).eval()


def test_ours_in_the_speech_recognition_pipeline_gives_the_same_inputs_and_text(tmp_path):
    model, tokenizer = tiny_model(transformers.Wav2Vec2BertForCTC), tiny_tokenizer(tmp_path / "vocab")
    audio = np.concatenate([CLIPS[0], CLIPS[2], CLIPS[1]])
    results = {}
    for extractor in (transformers.SeamlessM4TFeatureExtractor(), FbankExtractor()):
        pipe = transformers.pipeline("automatic-speech-recognition", model=model, tokenizer=tokenizer,
                                     feature_extractor=extractor, device="cpu")
        chunked = dict(chunk_length_s=1.0, stride_length_s=0.2)  # the pipeline's chunk_iter calls the extractor
        results[type(extractor)] = (list(pipe.preprocess(audio)), list(pipe.preprocess(audio, **chunked)),
                                    pipe(audio)["text"], pipe(audio, **chunked)["text"])
    ours, theirs = results[FbankExtractor], results[transformers.SeamlessM4TFeatureExtractor]
    for mine, expected in zip(ours[0] + ours[1], theirs[0] + theirs[1], strict=True):
        assert mine.keys() == expected.keys() and mine.get("stride") == expected.get("stride")
        assert_same_batch(FeatureBatch({k: mine[k] for k in FbankExtractor.model_input_names}),
                          {k: expected[k] for k in FbankExtractor.model_input_names})
    assert ours[2:] == theirs[2:]


def test_ours_in_the_audio_classification_pipeline_gives_the_same_scores():
    model = tiny_model(transformers.Wav2Vec2BertForSequenceClassification)
    results = []
    for extractor in (transformers.SeamlessM4TFeatureExtractor(), FbankExtractor()):
        pipe = transformers.pipeline("audio-classification", model=model, feature_extractor=extractor, device="cpu")
        results.append((pipe.preprocess(CLIPS[0]), pipe(CLIPS[0])))
    (their_inputs, theirs), (our_inputs, ours) = results
    assert_same_batch(our_inputs, their_inputs)
    assert [r["label"] for r in ours] == [r["label"] for r in theirs]
    assert np.allclose([r["score"] for r in ours], [r["score"] for r in theirs], atol=1e-4)
