"""Evaluation: the field's protocols, exactly (`shared/design/METRICS.md`).

  metrics     RGB L1 and Alpha IoU of single layers
  evaluators  evaluators by name (`layers`, `layerd`, `reflade`): what a config or a
              benchmark lists; the trainer's periodic evaluation and the command share them
  layerd      LayerD's Crello protocol: grouping, DTW alignment, merge edits, the edit curve;
              LayerD-format folders (read and write)
  lpips       LPIPS (the `lpips` package's v0.1 definition), ported
  inception   FID's Inception-v3 features, the Frechet distance and KID, ported
  reflade     RefLade's HPA (S_vis, S_gen, S_fid) and Pass-rate@K
  amodal      amodal mIoU (C2F-Seg's evaluation) on COCOA
  baselines   the trivial layers and a classical peeling from the engine's offline tools
  folder      any system's predictions on disk against ground truth on disk
  outputs     flat scores, the Markdown table, the per-sample CSV, histograms and curves
  __main__    python -m layerjax.evaluate --benchmark folder|crello|reflade|cocoa
"""
