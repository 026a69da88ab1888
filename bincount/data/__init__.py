"""Where photos come from and how they become tensors.

    sources    where the data comes from (public bucket, S3-compatible, folder, synthetic)
    synthetic  generated bin-like images in the bucket layout
    fetch      choosing and downloading a class-balanced subset
    split      stratified train/validation/test split
    images     how photos become tensors (decode, augment, normalise)
    captures   SageMaker's data-capture records: reading, writing, the photos in them
    shards     photos in WebDataset tar shards with an index; loader: reading them for training
    blobs      whole objects at a folder or s3:// URL (shards, checkpoints, trial records)
    layout     the bucket's layout (bin-images/<id>.jpg, metadata/<id>.json)
    progress   progress bars that suit a terminal and a Metaflow log
"""
