"""The model-backed engine tools on tiny random transformers models: each model and its
processor are built from configs, saved as safetensors to a temp folder, loaded by the tool
through `core.create`, and its answers are compared with the same processor + model +
library post-processing called directly here. Also: the errors for bad weight folders, the
ensemble's merge rule on hand-made boxes, and the engine's stages running on these tools."""

import json
import re
import string
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image
from safetensors.torch import load_file, save_file

from data_engine import core, stages
from data_engine import config as engine_config
from data_engine.tools import hf_detectors, imaging, matting
from data_engine.tools.types import Detection
from layerjax.data.schema import Layer
from pymatting import estimate_foreground_ml

H, W = 48, 64
YY, XX = np.mgrid[:H, :W]
DISC = (YY - 24) ** 2 + (XX - 40) ** 2 <= 11 ** 2
SQUARE = (YY >= 6) & (YY < 20) & (XX >= 6) & (XX < 22)


def _photo() -> np.ndarray:
  """Textured green with a red disc and a blue square, exactly representable in 8 bits."""
  rng = np.random.default_rng(0)
  rgb = np.array([0.35, 0.5, 0.35]) + 0.05 * rng.standard_normal((H, W, 3))
  rgb[DISC] = (0.85, 0.15, 0.1)
  rgb[SQUARE] = (0.1, 0.2, 0.8)
  return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


PHOTO_U8 = _photo()
PHOTO = PHOTO_U8.astype(np.float32) / 255
PIL_PHOTO = Image.fromarray(PHOTO_U8)


def _tiny(model_class, config, seed: int, std: float = 0.2):
  """A model with seeded default init plus N(0, std) noise on every parameter: varied,
  non-degenerate outputs."""
  torch.manual_seed(seed)
  model = model_class(config)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=g) * std)
  return model.eval()


def _save(folder, model, processor):
  model.save_pretrained(folder, safe_serialization=True)
  processor.save_pretrained(folder)
  return str(folder)


def _clip_tokenizer() -> tf.CLIPTokenizer:
  """Byte-level BPE over single letters (no merges); specials last, as in CLIP's vocab (OWLv2
  treats a query starting with token id 0 as padding)."""
  vocab = {}
  for c in string.ascii_lowercase + '.,':
    vocab[c] = len(vocab)
    vocab[c + '</w>'] = len(vocab)
  vocab['<|startoftext|>'] = len(vocab)
  vocab['<|endoftext|>'] = len(vocab)
  return tf.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def _clip_towers(tokenizer) -> dict:
  n = len(tokenizer)
  text = dict(vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, max_position_embeddings=16, bos_token_id=n - 2,
              eos_token_id=n - 1, pad_token_id=n - 1)
  vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                image_size=32, patch_size=8)
  return dict(text_config=text, vision_config=vision, projection_dim=16)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """Tiny saved models by tool name."""
  root = tmp_path_factory.mktemp('weights')
  out = {}
  tok = _clip_tokenizer()
  owl = _tiny(tf.Owlv2ForObjectDetection, tf.Owlv2Config(**_clip_towers(tok)), 1)
  out['owlv2'] = _save(root / 'owlv2', owl, tf.Owlv2Processor(
      image_processor=tf.Owlv2ImageProcessor(size={'height': 32, 'width': 32}), tokenizer=tok))

  words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '.', 'red', 'ball', 'dog', 'cat', 'a']
  bert = tf.BertTokenizer(vocab={w: i for i, w in enumerate(words)}, model_max_length=16)
  swin = tf.SwinConfig(window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                       image_size=64, out_indices=[2, 3, 4])
  gd = tf.GroundingDinoConfig(
      d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
      decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=8,
      encoder_n_points=2, decoder_n_points=2, backbone_config=swin, max_text_len=16,
      text_config=dict(model_type='bert', vocab_size=len(words), hidden_size=8,
                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                       max_position_embeddings=16))
  out['grounding_dino'] = _save(
      root / 'grounding_dino', _tiny(tf.GroundingDinoForObjectDetection, gd, 2),
      tf.GroundingDinoProcessor(image_processor=tf.GroundingDinoImageProcessor(
          size={'shortest_edge': 96, 'longest_edge': 128}), tokenizer=bert))

  sam = tf.SamConfig(
      vision_config=dict(hidden_size=16, output_channels=16, num_hidden_layers=1,
                         num_attention_heads=2, image_size=64, patch_size=8, window_size=4,
                         global_attn_indexes=[0], mlp_dim=32, num_pos_feats=8),
      prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8,
                                 mask_input_channels=4),
      mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=1,
                               num_attention_heads=2, iou_head_hidden_dim=16))
  out['sam'] = _save(root / 'sam', _tiny(tf.SamModel, sam, 3), tf.SamProcessor(
      image_processor=tf.SamImageProcessor(
          size={'longest_edge': 64}, pad_size={'height': 64, 'width': 64},
          mask_size={'longest_edge': 16}, mask_pad_size={'height': 16, 'width': 16})))

  dinov2 = tf.Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, image_size=28, patch_size=14,
                           out_features=['stage1', 'stage2'], reshape_hidden_states=False)
  depth = tf.DepthAnythingConfig(backbone_config=dinov2, reassemble_hidden_size=16,
                                 reassemble_factors=[2, 1], neck_hidden_sizes=[8, 16],
                                 fusion_hidden_size=8, head_hidden_size=8)
  out['depth_anything'] = _save(
      root / 'depth_anything', _tiny(tf.DepthAnythingForDepthEstimation, depth, 5),
      tf.DPTImageProcessor(size={'height': 28, 'width': 28}, keep_aspect_ratio=True,
                           ensure_multiple_of=14))

  vitdet = tf.VitDetConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           mlp_ratio=2, image_size=64, pretrain_image_size=64, patch_size=16,
                           num_channels=4, out_features=['stage2'])
  vitmatte = tf.VitMatteConfig(backbone_config=vitdet, hidden_size=16,
                               convstream_hidden_sizes=[4, 8, 8], fusion_hidden_sizes=[16, 8, 8, 4])
  out['vitmatte'] = _save(root / 'vitmatte',
                          _tiny(tf.VitMatteForImageMatting, vitmatte, 5, std=0.5),
                          tf.VitMatteImageProcessor())

  clip = _tiny(tf.CLIPModel, tf.CLIPConfig(**_clip_towers(tok)), 6)
  out['clip'] = _save(root / 'clip', clip, tf.CLIPProcessor(
      image_processor=tf.CLIPImageProcessor(size={'shortest_edge': 32},
                                            crop_size={'height': 32, 'width': 32}),
      tokenizer=tok))
  return out


def _reference(model_class, processor_class, folder):
  model = model_class.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
  return model, processor_class.from_pretrained(folder, local_files_only=True)


def _expected_detections(boxes, scores, labels, max_objects):
  """Integer end-exclusive boxes clipped to the photo, empty ones dropped, best first."""
  rows = []
  for (x0, y0, x1, y1), s, label in zip(boxes.tolist(), scores.tolist(), labels):
    box = (min(max(int(np.floor(x0)), 0), W), min(max(int(np.floor(y0)), 0), H),
           min(max(int(np.ceil(x1)), 0), W), min(max(int(np.ceil(y1)), 0), H))
    if box[2] > box[0] and box[3] > box[1]:
      rows.append((box, s, label))
  rows.sort(key=lambda r: -r[1])
  return rows[:max_objects]


def _assert_detections(found, expected):
  assert len(found) == len(expected) > 0
  for d, (box, score, label) in zip(found, expected):
    assert isinstance(d, Detection) and all(type(v) is int for v in d.box)
    assert d.box == box and d.label == label
    assert 0 <= d.box[0] < d.box[2] <= W and 0 <= d.box[1] < d.box[3] <= H
    np.testing.assert_allclose(d.score, score, rtol=1e-6)


# --- detectors ---------------------------------------------------------------------------------

def test_owlv2_matches_transformers(folders):
  labels = ['red ball', 'dog']
  tool = core.create('detector', {'name': 'owlv2', 'path': folders['owlv2'], 'labels': labels,
                                  'threshold': 0.3, 'max_objects': 6})
  found = tool(PHOTO)
  model, processor = _reference(tf.Owlv2ForObjectDetection, tf.Owlv2Processor, folders['owlv2'])
  with torch.no_grad():
    outputs = model(**processor(text=[labels], images=PIL_PHOTO, return_tensors='pt'))
  ref = processor.post_process_grounded_object_detection(
      outputs, threshold=0.3, target_sizes=[(H, W)], text_labels=[labels])[0]
  assert len(ref['scores']) > 6  # so that max_objects and the ordering are exercised
  raw = ref['boxes'].numpy()
  assert (raw[:, :2] < 0).any() and (raw[:, 2] > W).any()  # and the clipping
  _assert_detections(found, _expected_detections(ref['boxes'].numpy(), ref['scores'].numpy(),
                                                 ref['text_labels'], 6))
  assert {d.label for d in found} <= set(labels)


def test_grounding_dino_labels_are_the_best_covered_query():
  labels = ['red ball', 'dog']
  assert hf_detectors.match_label('red dog', labels) == 'dog'  # all of one, half of the other
  assert hf_detectors.match_label('red ball. dog. [SEP]', labels) == 'red ball'  # tie: first
  assert hf_detectors.match_label('ball', labels) == 'red ball'
  assert hf_detectors.match_label('[SEP]', labels) == ''
  assert hf_detectors.match_label('', labels) == ''


def test_grounding_dino_matches_transformers(folders):
  labels = ['red ball', 'dog']
  tool = core.create('detector', {'name': 'grounding_dino', 'path': folders['grounding_dino'],
                                  'labels': labels, 'threshold': 0.2, 'text_threshold': 0.5,
                                  'max_objects': 5})
  found = tool(PHOTO)
  model, processor = _reference(tf.GroundingDinoForObjectDetection, tf.GroundingDinoProcessor,
                                folders['grounding_dino'])
  inputs = processor(images=PIL_PHOTO, text='red ball. dog.', return_tensors='pt')
  with torch.no_grad():
    outputs = model(**inputs)
  ref = processor.post_process_grounded_object_detection(
      outputs, inputs['input_ids'], threshold=0.2, text_threshold=0.5, target_sizes=[(H, W)])[0]
  names = [hf_detectors.match_label(p, labels) for p in ref['text_labels']]
  assert any(names)
  _assert_detections(found, _expected_detections(ref['boxes'].numpy(), ref['scores'].numpy(),
                                                 names, 5))


@core.register('detector', 'fixed_for_test')
class Fixed:
  """Returns the detections it was built with."""

  def __init__(self, found):
    self.found = [Detection(tuple(box), score, label) for box, score, label in found]

  def __call__(self, image):
    return list(self.found)


def test_ensemble_merge_rule_on_hand_made_boxes():
  a = [((10, 10, 50, 50), 0.9, 'person'), ((60, 60, 90, 90), 0.4, 'dog'),  # dog: under 0.5
       ((12, 10, 52, 50), 0.6, 'person'), ((71, 10, 91, 30), 0.55, ''),
       ((20, 70, 30, 80), 0.7, 'ball'), ((40, 60, 60, 80), 0.8, 'kite'),
       ((49, 60, 69, 80), 0.5, 'kite')]  # exactly at the threshold: kept
  b = [((11, 11, 51, 51), 0.3, 'a man'), ((70, 10, 90, 30), 0.25, 'cup'),
       ((21, 70, 31, 80), 0.7, 'ball'), ((30, 10, 70, 50), 0.35, 'person'),
       ((44, 60, 64, 80), 0.55, '')]
  spec = {'name': 'ensemble', 'iou': 0.5, 'thresholds': [0.5, 0.2],
          'members': [{'name': 'fixed_for_test', 'found': a},
                      {'name': 'fixed_for_test', 'found': b}]}
  found = core.create('detector', dict(spec, max_objects=10))(PHOTO)
  expected = [
      # Equal scores: x0 = (20 + 21) / 2 = 20.5 rounds half up to 21; both members saw it.
      ((21, 70, 31, 80), 0.7, 'ball'),
      # Weights 0.8, 0.55: x0 = (32 + 24.2) / 1.35 = 41.6, x1 = 61.6; score mean(0.8, 0.55).
      ((42, 60, 62, 80), 0.675, 'kite'),
      # Weights 0.9, 0.6, 0.3: x0 = (9 + 7.2 + 3.3) / 1.8 = 10.83, y0 = 10.17, x1 = 50.83,
      # y1 = 50.17; score = mean(0.9, 0.3); label of the best box.
      ((11, 10, 51, 50), 0.6, 'person'),
      # Leader unlabelled: the label comes from the next box; x0 = 70.69, x1 = 90.69.
      ((71, 10, 91, 30), 0.4, 'cup'),
      # IoU 0.6 with the kite's second box but 0.38 with its leader: a cluster of its own.
      ((49, 60, 69, 80), 0.25, 'kite'),
      # IoU 1/3 with the person's leader (<= 0.5): an object of its own, seen by one member.
      ((30, 10, 70, 50), 0.175, 'person')]
  assert [(d.box, d.label) for d in found] == [(box, label) for box, _, label in expected]
  np.testing.assert_allclose([d.score for d in found], [s for _, s, _ in expected], rtol=1e-12)
  assert all(d.mask is None for d in found)
  assert [d.box for d in core.create('detector', dict(spec, max_objects=2))(PHOTO)] == [
      (21, 70, 31, 80), (42, 60, 62, 80)]


def test_ensemble_rejects_bad_options():
  member = {'name': 'fixed_for_test', 'found': []}
  with pytest.raises(ValueError, match='2 thresholds for 1 members'):
    core.create('detector', {'name': 'ensemble', 'members': [member], 'thresholds': [0.1, 0.2]})
  with pytest.raises(ValueError, match='at least one detector'):
    core.create('detector', {'name': 'ensemble', 'members': []})


# --- segmentation, depth, matting ----------------------------------------------------------------

def test_sam_matches_transformers(folders):
  box = (27, 11, 54, 38)
  mask = core.create('segmenter', {'name': 'sam', 'path': folders['sam']})(PHOTO, box)
  model, processor = _reference(tf.SamModel, tf.SamProcessor, folders['sam'])
  inputs = processor(images=PIL_PHOTO, input_boxes=[[list(box)]], return_tensors='pt')
  with torch.no_grad():
    outputs = model(pixel_values=inputs['pixel_values'], input_boxes=inputs['input_boxes'],
                    multimask_output=True)
  candidates = processor.post_process_masks(outputs.pred_masks, inputs['original_sizes'],
                                            inputs['reshaped_input_sizes'])[0][0].numpy()
  best = int(outputs.iou_scores[0, 0].argmax())
  assert mask.shape == (H, W) and mask.dtype == bool
  np.testing.assert_array_equal(mask, candidates[best])
  # The choice matters: the candidates differ, and the mask is neither empty nor everything.
  assert any(not np.array_equal(c, candidates[best]) for c in candidates)
  assert 0 < mask.mean() < 1


def test_depth_anything_matches_transformers_and_orders_by_median_nearness(folders):
  tool = core.create('depth', {'name': 'depth_anything', 'path': folders['depth_anything']})
  near = tool(PHOTO)
  model, processor = _reference(tf.DepthAnythingForDepthEstimation, tf.DPTImageProcessor,
                                folders['depth_anything'])
  with torch.no_grad():
    outputs = model(**processor(images=PIL_PHOTO, return_tensors='pt'))
  depth = processor.post_process_depth_estimation(outputs, target_sizes=[(H, W)])[0]
  depth = depth['predicted_depth'].numpy()
  expected = (depth - depth.min()) / (depth.max() - depth.min())
  assert near.shape == (H, W) and near.dtype == np.float32
  assert near.min() == 0 and near.max() == 1
  np.testing.assert_allclose(near, expected, atol=1e-6)

  masks = [DISC, SQUARE, ~(DISC | SQUARE), np.zeros((H, W), bool)]
  medians = [np.median(expected[m]) for m in masks[:3]]
  assert len(set(np.round(medians, 4))) == 3  # distinct, so the order is decided by depth
  want = [3] + sorted(range(3), key=lambda i: medians[i])  # empty first, then far to near
  assert tool.order(masks, PHOTO) == want
  # A tie in median nearness: the smaller mask is in front. {p, q, r} with q nearest and r
  # farthest has the median of {p} alone.
  flat = near.ravel()
  q, r = int(np.argmax(flat)), int(np.argmin(flat))
  p = next(i for i in range(flat.size) if flat[r] < flat[i] < flat[q])
  one, three = np.zeros(H * W, bool), np.zeros(H * W, bool)
  one[p] = three[[p, q, r]] = True
  one, three = one.reshape(H, W), three.reshape(H, W)
  assert tool.order([one, three], PHOTO) == [1, 0]
  assert tool.order([three, one], PHOTO) == [0, 1]


def test_vitmatte_matches_transformers_on_the_offline_trimap_and_crop(folders):
  band, context = 3, 6  # the disc (radius 11) is thick enough that band 3 is not narrowed
  alpha, fg = core.create('matting', {'name': 'vitmatte', 'path': folders['vitmatte'],
                                      'band': band, 'context': context})(PHOTO, DISC)
  model, processor = _reference(tf.VitMatteForImageMatting, tf.VitMatteImageProcessor,
                                folders['vitmatte'])
  crop = imaging.crop_around(DISC, band + context)
  tri = matting.trimap(DISC[crop], band)
  inputs = processor(images=Image.fromarray(PHOTO_U8[crop]),
                     trimaps=Image.fromarray(np.round(tri * 255).astype(np.uint8)),
                     return_tensors='pt')
  with torch.no_grad():
    raw = model(**inputs).alphas[0, 0].numpy()[:tri.shape[0], :tri.shape[1]]
  want = np.where(tri == 0.5, np.clip(raw, 0, 1), tri)
  assert alpha.shape == (H, W) and fg.shape == (H, W, 3)
  assert alpha.dtype == np.float32 and fg.dtype == np.float32
  np.testing.assert_allclose(alpha[crop], want, atol=1e-6)
  unknown = tri == 0.5
  assert np.ptp(alpha[crop][unknown]) > 0.01  # the model's answer, not a constant
  outside = np.ones((H, W), bool)
  outside[crop] = False
  assert (alpha[outside] == 0).all() and np.array_equal(fg[outside], PHOTO[outside])
  ref_fg = np.clip(estimate_foreground_ml(PHOTO[crop].astype(np.float64), want), 0, 1)
  np.testing.assert_allclose(fg[crop], ref_fg, atol=1e-5)


# --- CLIP text agreement -----------------------------------------------------------------------

def _object_layer(caption='a red ball', label='ball') -> Layer:
  rgba = np.zeros((H, W, 4), np.float32)
  rgba[..., :3] = PHOTO
  rgba[..., 3] = DISC * 1.0
  rgba[20:24, 29, 3] = 0.5  # a soft pixel, so the composite over grey is exercised
  return Layer('object_1', 'object', rgba, label=label, caption=caption)


def _clip_probabilities(folder, layer, texts) -> np.ndarray:
  model, processor = _reference(tf.CLIPModel, tf.CLIPProcessor, folder)
  a = layer.rgba[..., 3:]
  grey = layer.rgba[..., :3] * a + 0.5 * (1 - a)
  x0, y0, x1, y1 = imaging.mask_box(layer.rgba[..., 3] > 0)
  crop = np.round(grey[y0:y1, x0:x1] * 255).astype(np.uint8)
  inputs = processor(text=texts, images=Image.fromarray(crop), return_tensors='pt', padding=True,
                     truncation=True)
  with torch.no_grad():
    return model(**inputs).logits_per_image[0].softmax(-1).numpy()


def test_clip_agreement_matches_transformers(folders):
  spec = {'name': 'clip', 'path': folders['clip'], 'negatives': ['ball', 'dog', 'cat']}
  layer = _object_layer()
  texts = ['a red ball', 'a photo of a dog', 'a photo of a cat']  # its own label is no distractor
  p = _clip_probabilities(folders['clip'], layer, texts)
  above = core.create('text_check', dict(spec, threshold=float(p[0]) - 1e-4))
  assert above.texts(layer) == texts
  agree, reason = above(layer)
  assert agree is True
  assert f'p={p[0]:.2f}' in reason and f"'a photo of a dog' {p[1]:.2f}" in reason
  agree, reason = core.create('text_check', dict(spec, threshold=float(p[0]) + 1e-4))(layer)
  assert agree is False and f'p={p[0]:.2f} <' in reason
  # Without a caption the label's template stands in; non-object and empty layers agree.
  assert above.texts(_object_layer(caption='')) == ['a photo of a ball', 'a photo of a dog',
                                                    'a photo of a cat']
  background = Layer('background', 'background', np.ones((H, W, 4), np.float32))
  assert above(background) == (True, '')
  empty = Layer('object_2', 'object', np.zeros((H, W, 4), np.float32), label='dog', caption='a dog')
  assert above(empty)[0] is True


def test_clip_agreement_rejects_too_few_negatives(folders):
  with pytest.raises(ValueError, match="text_check 'clip': negatives"):
    core.create('text_check', {'name': 'clip', 'path': folders['clip'], 'negatives': ['dog']})


# --- bad weight folders --------------------------------------------------------------------------

TOOLS = [('detector', 'owlv2', {'labels': ['dog']}),
         ('detector', 'grounding_dino', {'labels': ['dog']}), ('segmenter', 'sam', {}),
         ('depth', 'depth_anything', {}), ('matting', 'vitmatte', {}),
         ('text_check', 'clip', {'negatives': ['dog', 'cat']})]


def _raises(error, text: str):
  return pytest.raises(error, match=re.escape(text))


@pytest.mark.parametrize('kind,name,options', TOOLS)
def test_bad_weight_folders_fail_at_create_naming_tool_and_path(kind, name, options, folders,
                                                               tmp_path):
  def create(path):
    return core.create(kind, {'name': name, 'path': str(path), **options})
  tool = f'{kind} {name!r}'
  missing = tmp_path / 'nowhere'
  with _raises(FileNotFoundError, f'{tool}: weights folder {missing} does not exist'):
    create(missing)
  bare = tmp_path / 'bare'
  bare.mkdir()
  with _raises(FileNotFoundError, f'{tool}: {bare} has no config.json'):
    create(bare)
  other = folders['sam' if name != 'sam' else 'clip']
  with _raises(ValueError, f'{tool}: {other}/config.json has model_type'):
    create(other)
  # Weights without the processor's files, and a checkpoint lacking a weight (which would be
  # left random): refused too.
  broken = tmp_path / 'broken'
  broken.mkdir()
  for f in ('config.json', 'model.safetensors'):
    (broken / f).write_bytes((Path(folders[name]) / f).read_bytes())
  with _raises(ValueError, f"{tool}: cannot load from {broken}: OSError: Can't load"):
    create(broken)
  for f in Path(folders[name]).iterdir():
    (broken / f.name).write_bytes(f.read_bytes())
  weights = load_file(broken / 'model.safetensors')
  del weights[sorted(weights)[-1]]
  save_file(weights, broken / 'model.safetensors', metadata={'format': 'pt'})
  with _raises(ValueError, f'{tool}: {broken} lacks or mis-shapes weights'):
    create(broken)


def test_config_json_that_is_not_an_object_and_missing_safetensors(folders, tmp_path):
  (tmp_path / 'config.json').write_text('[1, 2]')
  with pytest.raises(ValueError, match=r"segmenter 'sam': .*config.json is not a JSON object"):
    core.create('segmenter', {'name': 'sam', 'path': str(tmp_path)})
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'sam'}))
  with pytest.raises(FileNotFoundError, match=r"segmenter 'sam': .* has no \.safetensors"):
    core.create('segmenter', {'name': 'sam', 'path': str(tmp_path)})
  with pytest.raises(ValueError, match="segmenter 'sam': bad device 'gpu0'"):
    core.create('segmenter', {'name': 'sam', 'path': folders['sam'], 'device': 'gpu0'})


# --- the engine on these tools -------------------------------------------------------------------

def test_stages_run_through_understand_on_model_backed_tools(folders, tmp_path):
  config = engine_config.default_config()
  config.decompose.min_side = 40
  owl = {'name': 'owlv2', 'path': folders['owlv2'], 'labels': ['red ball', 'dog'],
         'threshold': 0.3}
  config.tools.detector = {'name': 'ensemble', 'members': [owl, {'name': 'saliency_boxes'}],
                           'thresholds': [0.3, 0.0], 'iou': 0.5, 'max_objects': 4}
  config.tools.segmenter = {'name': 'sam', 'path': folders['sam']}
  config.tools.depth = {'name': 'depth_anything', 'path': folders['depth_anything']}
  config.tools.matting = {'name': 'vitmatte', 'path': folders['vitmatte']}
  config.tools.text_check = {'name': 'clip', 'path': folders['clip'], 'negatives': ['dog', 'cat']}
  ctx = stages.Context(config)
  assert type(ctx.tools['text_check']).__name__ == 'ClipAgreement'
  Image.fromarray(PHOTO_U8).save(tmp_path / 'photo.png')
  item = stages.Photo('photo', 'photo.png', str(tmp_path / 'photo.png'))
  _, record = stages.run(item, ctx)
  by_stage = {d.stage: d for d in record}
  assert all(by_stage[s].passed for s in ('load', 'prefilter', 'understand')), record
  understood = by_stage['understand'].details
  assert understood['detections'] >= 1 and 1 <= understood['objects'] <= 4
  for o in item.objects:  # SAM's masks, made disjoint in depth order
    assert o.mask.shape == (H, W) and o.mask.any()
  # Matting runs ViTMatte on every object; later stages may still drop this random photo.
  assert by_stage['matte'].passed, by_stage['matte']
