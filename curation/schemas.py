"""Arrow schemas of the per-shard artifacts: the contract between stages and the catalog."""
import pyarrow as pa

SAMPLES = pa.schema(
    [
        ("sample_id", pa.string()),  # stable: hash of shard name and key
        ("shard", pa.string()),
        ("key", pa.string()),
        ("idx", pa.int32()),  # position of the sample in its shard
        ("shard_url", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),  # decoded format (jpeg, png, webp, ...)
        ("ext", pa.string()),  # the member's extension in the tar
        ("mode", pa.string()),
        ("bytes", pa.int64()),
        ("meta", pa.string()),  # the sample's original json, verbatim
    ]
)

REJECTS = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),  # null when the failure is not tied to one sample
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("url", pa.string()),
    ]
)

SHARDS = pa.schema(
    [
        ("shard", pa.string()),
        ("shard_url", pa.string()),
        ("fingerprint", pa.string()),
        ("config_hash", pa.string()),
        ("n_read", pa.int64()),
        ("n_accepted", pa.int64()),
        ("n_rejected", pa.int64()),
        ("seconds", pa.float64()),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
    ]
)

EMBEDDINGS = pa.schema([("embedder", pa.string()), ("shard", pa.string()), ("row", pa.int32()),
                        ("sample_id", pa.string()), ("ok", pa.bool_())])

DUPS = pa.schema([("embedder", pa.string()), ("sample_id", pa.string()), ("cluster_id", pa.string()),
                  ("cluster_size", pa.int32()), ("is_representative", pa.bool_())])

CLUSTERS = pa.schema([("embedder", pa.string()), ("sample_id", pa.string()), ("cluster", pa.int32()),
                      ("centroid_sim", pa.float32())])

KNN_SCORES = pa.schema([("name", pa.string()), ("embedder", pa.string()), ("sample_id", pa.string()),
                        ("knn_sim", pa.float32())])
