"""Evaluation: the field's protocols, exactly (`shared/design/METRICS.md`).

  metrics     RGB L1 and Alpha IoU of single layers
  layerd      LayerD's Crello protocol: grouping, DTW alignment, merge edits, the edit curve
  lpips       LPIPS (the `lpips` package's v0.1 definition), ported
  inception   FID's Inception-v3 features and the Frechet distance, ported
  reflade     RefLade's HPA (S_vis, S_gen, S_fid) and Pass-rate@K
  amodal      amodal mIoU (C2F-Seg's evaluation) on COCOA
"""
