"""Train, evaluate and deploy a model that counts the items in bin photos.

    start -> fetch_subset (foreach chunk of bins) -> gather_subset -> split
          -> train (foreach grid point) -> join -> evaluate -> deploy -> end

Every step is a few lines that call the bincount library. The photos are written
once, by fetch_subset, into shards in the run's own storage (under the S3
datastore's root with --datastore s3); artifacts carry their index (id, label,
shard, checksum) and everything else, so any step can run on another machine. Heavy
libraries (torch) are imported inside steps: each task is a new process that
re-imports this file.

    python flows/bin_flow.py run --source ../shared/abid-sample
    python flows/bin_flow.py run --source synthetic --config grid flows/grids/tiny.json
    python flows/bin_flow.py resume
    python flows/bin_flow.py --config compute flows/compute/batch.example.json run   # train on AWS Batch
"""

import os

from metaflow import Config, FlowSpec, Parameter, card, current, project, step

from bincount.flow import cards
from bincount.flow.compute import compute_from_config

DEFAULT_GRID = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grids", "default.json")
DEPLOY_TARGETS = ("local", "local-toolkit", "sagemaker", "none")


def open_bins(flow):
    """The flow's --source as a bincount source."""
    from bincount.data.sources import open_source

    return open_source(flow.source, classes=flow.class_list, seed=flow.seed, max_pool_connections=flow.workers,
                       synthetic_per_class=flow.per_class)


def fetch_plan(flow) -> list[dict]:
    """The candidate bins in the order a seed visits them, cut in --fetch-tasks chunks."""
    from bincount.data.fetch import candidate_order, chunks, read_file_list

    order = candidate_order(open_bins(flow), read_file_list(flow.file_list) if flow.file_list else None,
                            seed=flow.seed)
    return chunks(order, flow.fetch_tasks)


@project(name="bincount")  # champions are per project branch (bincount/flow/champion.py)
@compute_from_config("compute")
class BinCountFlow(FlowSpec):
    source = Parameter(
        "source", default="s3://aft-vbi-pds",
        help="Where the bins come from: the public bucket (default, anonymous), any s3:// URL "
             "(an S3-compatible server via AWS_ENDPOINT_URL), a local folder in the bucket layout "
             "(bin-images/<id>.jpg, metadata/<id>.json), or 'synthetic' (generated, offline).")
    file_list = Parameter(
        "file-list", default="",
        help="Use exactly these bins: a JSON file in the Udacity file_list.json format "
             "({\"1\": [\"metadata/<id>.json\", ...], ...}). Without it, bins are sampled per class.")
    per_class = Parameter("per-class", default=200, type=int,
                          help="Bins per class when there is no file list.")
    classes = Parameter("classes", default="1-5", help="Counts to learn: 1-5, or 0-5 to include empty bins.")
    seed = Parameter("seed", default=0, type=int, help="Seeds the subset, the split and training.")
    val_fraction = Parameter("val-fraction", default=0.15, type=float, help="Share of bins for validation.")
    test_fraction = Parameter("test-fraction", default=0.15, type=float, help="Share of bins for the test.")
    workers = Parameter("workers", default=32, type=int, help="Parallel downloads in each fetch_subset task.")
    fetch_tasks = Parameter("fetch-tasks", default=1, type=int,
                            help="Split the download over this many fetch_subset tasks (a foreach over chunks of "
                                 "the bins, each its own machine on Batch or Kubernetes); the same bins are chosen "
                                 "for a seed whatever the number.")
    shard_mb = Parameter("shard-mb", default=256.0, type=float,
                         help="Size of each photo shard, in MB (AWS suggests 100-1000 for reads from S3).")
    cache_mb = Parameter("cache-mb", default=512.0, type=float,
                         help="Decoded training and validation photos a train task may keep in memory (MB); "
                              "beyond it they stream from the shards every epoch instead.")
    deploy_target = Parameter("deploy-target", default="local",
                              help="local: package the model and check it behind a local endpoint; "
                                   "local-toolkit: the same behind SageMaker's own PyTorch serving toolkit "
                                   "and TorchServe, run here (pip install 'bincount[toolkit]', Java 17); "
                                   "sagemaker: create or update a SageMaker endpoint (settings from "
                                   "--config deploy PATH); none: skip deployment.")
    require_all_points = Parameter("require-all-points", default=False, type=bool, is_flag=True,
                                   help="Fail the run when any grid point fails after its retries (by default the "
                                        "join goes on with the points that trained and names the failed ones).")
    warm_start = Parameter("warm-start", default="",
                           help="RUN_ID: the grid's search learns from that run's search trials too (those in "
                                "this search's space): a tpe search draws from them, and early stopping "
                                "compares against them.")
    force_deploy = Parameter("force-deploy", default=False, type=bool, is_flag=True,
                             help="Deploy even if the model is less accurate than the target's current "
                                  "champion (the run tagged champion:<target>).")
    # Each Config is checked for types and ranges as it is read (bincount.flow.configs), before any task.
    grid = Config("grid", default=DEFAULT_GRID, parser="bincount.flow.configs.parse_grid",
                  help="Hyperparameter grid (JSON): {\"defaults\": {...}, \"points\": [{...}, ...]}.")
    deploy_config = Config("deploy", default_value={}, parser="bincount.flow.configs.parse_deploy",
                           help="SageMaker deploy settings (JSON): see flows/deploy/sagemaker.example.json.")
    compute = Config("compute", default_value={"compute": "local"}, parser="bincount.flow.configs.parse_compute",
                     help="Where the train step runs (JSON): {\"compute\": \"local\"} (default), or batch, "
                          "kubernetes or sagemaker with their settings: see flows/compute/*.example.json.")

    @step
    def start(self):
        """Validate every option before any download or training starts."""
        from bincount.data.fetch import parse_classes
        from bincount.flow.compute import ComputeConfig
        from bincount.flow.search import warm_trials
        from bincount.model.grid import plan_grid

        if self.deploy_target not in DEPLOY_TARGETS:
            raise ValueError(f"--deploy-target {self.deploy_target!r}: choose one of {DEPLOY_TARGETS}")
        if self.deploy_target == "sagemaker":  # fail before training, not after it
            from bincount.sagemaker.endpoint import SageMakerTarget

            SageMakerTarget.from_config(self.deploy_config.to_dict())
        compute = ComputeConfig.from_dict(self.compute.to_dict())
        print(f"train step compute: {compute.describe()}")
        if self.fetch_tasks < 1:
            raise ValueError(f"--fetch-tasks {self.fetch_tasks}: need at least 1")
        self.class_list = parse_classes(self.classes)
        self.grid_points = plan_grid(self.grid.to_dict())  # fixed points, then a search's trials
        self.warm_trials = warm_trials(self.grid.to_dict(), compute, self.warm_start)  # and checks the search
        self.quota = None if self.file_list else self.per_class  # bins per class; None: every usable one listed
        self.fetch_chunks = fetch_plan(self)
        self.next(self.fetch_subset, foreach="fetch_chunks")

    @step
    def fetch_subset(self):
        """Download one chunk of the candidate bins into shards, up to --per-class of each class."""
        from bincount.data.fetch import fetch_subset
        from bincount.data.shards import ShardSink
        from bincount.flow.storage import shard_root

        chunk = self.input
        prefix = "" if len(self.fetch_chunks) == 1 else f"part{chunk['index']:03d}-"
        with ShardSink(shard_root(self, current.flow_name, current.run_id), max_bytes=int(self.shard_mb * 2**20),
                       prefix=prefix) as sink:
            self.part = fetch_subset(open_bins(self), classes=self.class_list, per_class=self.quota,
                                     candidate_ids=chunk["ids"], ordered=True, offset=chunk["offset"],
                                     workers=self.workers, sink=sink)
            self.part_shards = sink.close().to_dict()
        self.next(self.gather_subset)

    @card(type="blank", id="report")
    @step
    def gather_subset(self, inputs):
        """The subset one download of every chunk in order would have chosen; record what was skipped and why."""
        from bincount.data.fetch import merge_parts, report_shortfall
        from bincount.data.shards import ShardSet

        self.merge_artifacts(inputs, exclude=["part", "part_shards"])
        subset = merge_parts([i.part for i in inputs], classes=self.class_list, per_class=self.quota)
        if not subset.ids:
            raise RuntimeError(f"no usable bins in {self.source} for classes {self.classes}")
        report_shortfall(subset, classes=self.class_list, per_class=self.quota)
        parts = [ShardSet.from_dict(i.part_shards) for i in inputs]
        self.shards = ShardSet(parts[0].root, tuple(s for p in parts for s in p.shards)).to_dict()  # where the photos are
        self.subset = subset.table()  # the index: id, label, width, height, shard, checksum
        self.skipped = subset.skipped_table()
        self.class_counts = subset.class_counts()
        print(f"kept {len(subset.ids)} bins {self.class_counts} in {len(self.shards['shards'])} shards under "
              f"{self.shards['root']}; skipped {len(self.skipped)}"
              + (f"; {subset.dropped} photos downloaded by one chunk were not needed" if subset.dropped else ""))
        cards.fetch_card(current.card, self)
        self.next(self.split)

    @card(type="blank", id="report")
    @step
    def split(self):
        """Stratified, seeded train/val/test split; where the grid's search has a tuner block, SageMaker's tuner
        runs the search here, and each of its training jobs becomes a train task that brings its model back."""
        from bincount.data.split import split_counts, split_ids
        from bincount.flow.search import tuned_trials

        self.split_table = split_ids(self.subset["id"].tolist(), self.subset["label"].tolist(),
                                     val_fraction=self.val_fraction, test_fraction=self.test_fraction,
                                     seed=self.seed)
        self.split_counts = split_counts(self.split_table)
        print(self.split_counts)
        self.grid_points = self.grid_points + tuned_trials(self, current)  # SageMaker's tuner, where the grid asks
        cards.split_card(current.card, self)
        self.next(self.train, foreach="grid_points")

    # @retry and the time limit come from the compute config (bincount.flow.compute); each retry goes on
    # from the point's last checkpoint. Once the retries are spent the failure is kept and the join goes
    # on without this point, unless --require-all-points (bincount.flow.failures).
    # refresh_interval is Metaflow's floor between refreshes, and a refresh inside it is dropped even when
    # forced: 1 s lets every one through; the epoch and SageMaker views throttle themselves (bincount.flow.cards).
    @card(type="blank", id="report", refresh_interval=1)
    @step
    def train(self):
        """Train one grid point, checkpointing every epoch; keep its curves, scores and best weights."""
        from bincount.flow.compute import ComputeConfig, train_branch
        from bincount.flow.failures import kept_after_retries
        from bincount.flow.runs import photos_in
        from bincount.flow.search import trial_settings
        from bincount.flow.storage import checkpoints_for
        from bincount.model.trials import grid_point

        compute, point = ComputeConfig.from_dict(self.compute.to_dict()), None
        with kept_after_retries(self, attempt=current.retry_count, retries=compute.retries,
                                require_all=self.require_all_points):
            # a fixed point, or a search trial: drawn, or drawing its values now from the trials before it
            with grid_point(self.input, **trial_settings(self, current, compute)) as point:
                cfg = point.config
                result = train_branch(compute, cfg, photos_in(self), self.split_table, self.class_list,
                                      seed=self.seed, cache_bytes=int(self.cache_mb * 2**20),
                                      job_prefix=f"{current.flow_name}-{current.run_id}-{current.task_id}",
                                      checkpoints=checkpoints_for(self, current, cfg.name),
                                      on_epoch=cards.train_progress(current.card, cfg.epochs),
                                      should_stop=point.stopping, job=self.input.get("job"),
                                      log=cards.job_progress(current.card, cfg.name))
                point.finish(result)
            for name, value in result.to_artifacts().items():  # scores, history, state_dict
                setattr(self, name, value)
            current.card.clear()  # the report replaces the progress shown while training
            cards.train_card(current.card, self)
        # the trial's values and outcome (None for a fixed point): the join gathers them for --warm-start
        self.search_trial = point.record.to_dict() if point is not None and point.record else None
        self.next(self.join)

    @card(type="blank", id="report")
    @card(type="bincount_sortable_table", id="grid", options={"title": "Grid points, ranked best first"})
    @step
    def join(self, inputs):
        """Keep the best grid point by validation accuracy (or the best few, averaged), and a table of all;
        name the points that failed after their retries."""
        from bincount.flow.failures import FAILURE_VAR, check_outcomes, sort_outcomes
        from bincount.flow.storage import discard_checkpoints
        from bincount.model.grid import select_config
        from bincount.model.selection import choose_model, results_table
        from bincount.model.train import TrainResult

        results, failed = sort_outcomes(inputs)
        for point in failed:
            print(f"grid point {point.name} failed after its retries: {point.error}")
        check_outcomes(results, failed, require_all=self.require_all_points)
        # Everything from before the foreach is the same in every branch; carry it on.
        self.merge_artifacts(inputs, exclude=[*TrainResult.ARTIFACTS, FAILURE_VAR, "search_trial"])
        self.failed_points = [point.to_dict() for point in failed]
        self.search_trials = [i.search_trial for i in inputs if i.search_trial]  # what --warm-start reads
        self.grid_results = results_table(results)
        self.grid_histories = {r.config["name"]: r.history for r in results}
        val = self.split_table[self.split_table["split"] == "val"]
        choice = choose_model(results, select_config(self.grid.to_dict()),
                              [self.class_list.index(label) for label in val["label"]], self.class_list,
                              flow=current.flow_name, run_id=current.run_id)
        self.chosen = choice.meta.grid_point
        self.ensemble = [m.grid_point for m in choice.meta.members]
        self.model_state = choice.state
        self.model_meta = choice.meta.to_dict()  # model.json
        print(f"serving {' + '.join(self.ensemble)}{' with flip TTA' if choice.meta.tta else ''}: "
              f"validation accuracy {choice.val_accuracy:.3f}")
        print(self.grid_results[["name", "val_accuracy", "val_loss", "best_epoch"]].to_string(index=False))
        # Two editable cards, so each is named (the grid card's type is in metaflow_extensions/).
        cards.join_card(current.card["report"], self)
        cards.grid_card(current.card["grid"], self)
        print(f"removed {discard_checkpoints(self, current)} training checkpoint(s): every grid point has ended")
        self.next(self.evaluate)

    @card(type="blank", id="report")
    @step
    def evaluate(self):
        """Score the chosen model on the test split with the forward pass the endpoint uses."""
        from bincount.flow.runs import photos_in
        from bincount.model.metrics import count_metrics
        from bincount.model.predictor import load_predictor

        test = self.split_table[self.split_table["split"] == "test"]
        predictor = load_predictor(self.model_state, self.model_meta)
        predictions = predictor.predict_photos(photos_in(self), test["id"], progress=True)
        self.test_predictions = dict(zip(test["id"], predictions))
        self.test_metrics = count_metrics(test["label"].tolist(), [p["count"] for p in predictions],
                                          self.class_list)
        print(f"test accuracy {self.test_metrics['accuracy']:.3f}, RMSE {self.test_metrics['rmse']:.3f}, "
              f"MAE {self.test_metrics['mae']:.3f} on {self.test_metrics['n']} bins")
        cards.evaluate_card(current.card, self)
        self.next(self.deploy)

    @card(type="blank", id="report")
    @step
    def deploy(self):
        """Deploy if the model beats the target's champion; smoke-test the endpoint."""
        from bincount.flow.deploy import promote
        from bincount.flow.runs import photos_in

        test = self.split_table[self.split_table["split"] == "test"]
        promotion = promote(self.deploy_target, run_id=current.run_id, state=self.model_state, meta=self.model_meta,
                            photos=photos_in(self), test_ids=test["id"].tolist(),
                            test_labels=test["label"].tolist(),
                            test_predictions=self.test_predictions, new_accuracy=self.test_metrics["accuracy"],
                            force=self.force_deploy, config=self.deploy_config.to_dict())
        self.deployment = promotion.deployment
        self.champion_decision = promotion.decision.to_dict() if promotion.decision else None
        if promotion.package is not None:
            self.model_package = promotion.package
        cards.deploy_card(current.card, self)
        self.next(self.end)

    @step
    def end(self):
        deployed = "deployed" if self.champion_decision and self.champion_decision["deploy"] else "not deployed"
        print(f"run {current.run_id}: chose {self.chosen}, test accuracy {self.test_metrics['accuracy']:.3f}, "
              f"{deployed}; serve it with `bincount serve --run {current.run_id}`")


if __name__ == "__main__":
    BinCountFlow()
