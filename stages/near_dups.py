"""Stage near_dups: find one photo repeated as a crop, resize, re-encode or brightness change under
another name, so the split can keep such images in one fold (pipeline/data/near_dups.py)."""
from pathlib import Path

import pandas as pd

from pipeline import cli
from pipeline.config import load_params
from pipeline.data.coco import dataset_from_params, load_test_set
from pipeline.data.near_dups import PAIR_COLUMNS, clusters, find_pairs, montage
from pipeline.io import atomic_dir
from pipeline.tracking import stage_run

PARAMS = ("data", "near_dups", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    n = p.near_dups
    with stage_run("near_dups", p) as run:
        images = dataset_from_params(p.data).images.assign(role="labelled")
        if n.include_test and p.data.test_json:
            test = load_test_set(p.data)
            images = pd.concat([images, test[~test.key.isin(images.key)].assign(role="test")], ignore_index=True)
        pairs = (find_pairs(images, hash_distance=n.hash_distance, min_inliers=n.min_inliers, side=n.side,
                            n_features=n.n_features, workers=n.workers)
                 if n.enabled else pd.DataFrame(columns=PAIR_COLUMNS))
        cluster = clusters(images.key.tolist(), pairs)
        table = images[["key", "role"]].assign(cluster=cluster.to_numpy())
        with atomic_dir(p.paths.near_dups) as out:
            pairs.to_csv(out / "pairs.csv", index=False)
            table[table.cluster >= 0].sort_values(["cluster", "key"]).to_csv(out / "clusters.csv", index=False)
            montage(images, cluster, out / "clusters.png")
        run.log_artifacts(p.paths.near_dups, "near_dups")
        role = table.set_index("key").role
        mixed = table[table.cluster >= 0].groupby("cluster").role.nunique() > 1
        test_twins = table[(table.role == "test") & table.cluster.isin(mixed[mixed].index)]
        run.write_metrics(Path(p.paths.metrics) / "near_dups.json", {"near_dups": {
            "images": len(images), "pairs": len(pairs),
            "pairs_by_method": {m: int((pairs.method == m).sum()) for m in ("hash", "orb", "both")},
            "clusters": int(cluster.max() + 1), "images_in_clusters": int((cluster >= 0).sum()),
            "largest_cluster": int(cluster[cluster >= 0].value_counts().max()) if (cluster >= 0).any() else 0,
            "labelled_pairs": int((pairs.key_a.map(role).eq("labelled") & pairs.key_b.map(role).eq("labelled")).sum()),
            "test_images_repeating_labelled": len(test_twins)}})


if __name__ == "__main__":
    cli.run(main)
