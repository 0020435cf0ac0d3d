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
        ("shard_url", pa.string()),  # what later stages read: the spec, or ingest's copy in sources/
        ("shard_origin", pa.string()),  # the spec as the user typed it (a pipe: command, a path, a URL)
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
                  ("cluster_size", pa.int32()), ("is_representative", pa.bool_()),
                  ("candidates_capped", pa.bool_())])  # the image had more look-alikes than dup_max_neighbors

CLUSTERS = pa.schema([("embedder", pa.string()), ("sample_id", pa.string()), ("cluster", pa.int32()),
                      ("centroid_sim", pa.float32())])

SELECTED = pa.schema([("selection", pa.string()), ("sample_id", pa.string()), ("weight", pa.float64()),
                      ("shard", pa.string()),  # the curated tar, a file in selections/<selection>/
                      ("position", pa.int32())])  # the sample's place in that tar, from 0

KNN_SCORES = pa.schema([("name", pa.string()), ("embedder", pa.string()), ("sample_id", pa.string()),
                        ("knn_sim", pa.float32())])

# The `scores` view's columns, documented in the catalog's `score_columns` table. For every
# score, higher = more in-distribution / more useful for distilling this teacher.
SCORE_COLUMNS: dict[str, str] = {
    "msp": "maximum softmax probability of the teacher (Hendrycks & Gimpel 2017)",
    "max_logit": "the teacher's largest logit (Hendrycks et al. 2022)",
    "energy": "negative free energy T*logsumexp(z/T) of the teacher's logits (Liu et al. 2020)",
    "neg_entropy": "minus the entropy of the teacher's softmax",
    "gen": "GEN: minus the generalised entropy sum p^0.1 (1-p)^0.1 over the top-100 classes (Liu et al. 2023)",
    "odin": "ODIN: softmax score at temperature T after an input step of size epsilon toward the predicted class "
            "(Liang et al. 2018)",
    "bn_score": "BatchNorm-statistics score: -sum over BN layers and channels of mean_hw(u)^2, u=(a-beta)/gamma; "
                "white-box, needs no data",
    "mahalanobis": "minus the Mahalanobis distance of teacher features to the nearest class mean (tied covariance), "
                   "class means and a Ledoit-Wolf shrunk covariance of the reference set: by default the pool's "
                   "samples several label-free scores agree on, at most a quota per pseudo-label, refined in rounds "
                   "(score --reference; docs/reference.md) (Lee et al. 2018)",
    "rel_mahalanobis": "minus the relative Mahalanobis distance: class distance minus the distance to the background "
                       "Gaussian of the reference samples (Ren et al. 2021)",
    "mahalanobis_layers": "multi-layer Mahalanobis: the mean over the feature layers (score --feature-layers; default "
                          "the classifier's input and the teacher's last two stages, pooled) of minus each layer's "
                          "Mahalanobis distance divided by its dimension, with class Gaussians of the same "
                          "reference set as mahalanobis (Lee et al. 2018); for nn.Module, TorchScript and .pt2 "
                          "teachers alike",
    "knn_teacher": "cosine similarity of teacher features to the k-th nearest sample of the reference set "
                   "(as for mahalanobis; score --reference) (Sun et al. 2022)",
    "scale": "SCALE: energy logsumexp(W f' + b) of the teacher's logits recomputed from its penultimate features f "
             "scaled by exp(s1/s2), s1 = sum(f), s2 = sum of the top 15% of f (p=85) (Xu et al. 2024)",
    "ash": "ASH-S: energy logsumexp(W f' + b) of the logits from f with all but its top 10% zeroed (p=90) and the rest "
           "scaled by exp(s1/s2), s1 / s2 the sums before / after pruning (Djurisic et al. 2023)",
    "react": "ReAct: energy logsumexp(W min(f, c) + b) of the logits from f clipped at c = the 90th percentile of the "
             "pool's penultimate activations (Sun et al. 2021)",
    "fused": "rank fusion: mean over msp, energy, gen, scale, ash, react, mahalanobis, bn_score (those not null over "
             "the pool) of the sample's percentile rank (rank-1)/(n-1) among the pool's values; in [0, 1]. Only "
             "label-free teacher scores: no student, no user reference (kNN to prompts or images)",
    "teacher_label": "the teacher's pseudo-label (argmax)",
    "teacher_conf": "the teacher's confidence in its pseudo-label (= msp)",
    "teacher_logits": "the teacher's logits, float16 (they go into the curated shards as logits.npy)",
    "student_label": "the student's prediction (with --student)",
    "student_conf": "the student's confidence (with --student)",
    "agreement": "1 when teacher and student predict the same class, else 0 (with --student)",
    "neg_kl": "minus KL(teacher || student) of the softmax outputs (with --student)",
    "neg_js": "minus the Jensen-Shannon divergence of teacher and student softmax outputs (with --student)",
    "kd3_label": ("KD^3 combined prediction softmax(a*z_T + (1-a)*z_S) (logits mixed, as the official code): "
                  "its label (teacher alone without a student)"),
    "kd3_conf": "KD^3 combined prediction: its confidence",
    "kd3_threshold": ("KD^3 class-adaptive threshold tau*s_c/(2-s_c), s_c = N_c/max N over every combined "
                      "prediction, of the sample's combined label"),
    "kd3_pass": "true when kd3_conf exceeds kd3_threshold (Tang et al. 2023)",
    "decoded": "false when the image could not be decoded again at scoring time (its scores are null)",
}

SCORES = pa.schema(
    [("run", pa.string()), ("sample_id", pa.string()), ("shard", pa.string()), ("row", pa.int32()),
     ("decoded", pa.bool_()), ("teacher_label", pa.int32()), ("teacher_conf", pa.float32()),
     *[(c, pa.float32()) for c in ("msp", "max_logit", "energy", "neg_entropy", "gen", "bn_score", "scale", "ash",
                                   "odin")],
     ("kd3_label", pa.int32()), ("kd3_conf", pa.float32()), ("teacher_logits", pa.list_(pa.float32())),
     ("mahalanobis", pa.float32()), ("rel_mahalanobis", pa.float32()), ("mahalanobis_layers", pa.float32()),
     ("knn_teacher", pa.float32()),
     ("react", pa.float32()), ("fused", pa.float32()),
     ("kd3_threshold", pa.float32()), ("kd3_pass", pa.bool_())]
)
