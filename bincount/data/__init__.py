"""Where photos come from and how they become tensors.

    sources    where the data comes from (public bucket, S3-compatible, folder, synthetic)
    synthetic  generated bin-like images in the bucket layout
    fetch      choosing and downloading a class-balanced subset
    split      stratified train/validation/test split
    images     how photos become tensors (decode, augment, normalise)
    progress   progress bars that suit a terminal and a Metaflow log
"""
