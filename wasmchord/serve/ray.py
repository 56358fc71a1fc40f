"""Scale-out on Ray Serve: the same OpenAI-compatible app as a Ray Serve deployment, each replica
loading the model and running its own batch engine (Ray Serve routes requests between replicas and
scales them with `autoscaling_config`). Needs `pip install "ray[serve]"`.

    from ray import serve
    from wasmchord.serve.ray import deployment
    serve.run(deployment("smollm2-135m-instruct", device="cpu", slots=4, num_replicas=2))
"""

from __future__ import annotations


def deployment(model: str, *, name: str | None = None, device: str = "auto", slots: int = 4,
               context_length: int | None = None, max_queue: int = 64, api_key: str | None = None,
               num_replicas: int | str = 1, autoscaling_config: dict | None = None, max_ongoing_requests: int = 64,
               ray_actor_options: dict | None = None):
    """A bound Ray Serve application of `wasmchord serve` for `model` (a path or an alias).

    `num_replicas` (or "auto" with `autoscaling_config`, e.g. {"min_replicas": 1, "max_replicas": 4,
    "target_ongoing_requests": 8}) and `max_ongoing_requests` are Ray Serve's; keep the latter near
    slots + max_queue so that Ray queues what a replica would refuse with 503."""
    from ..errors import UnsupportedError
    try:
        from ray import serve
    except ImportError as e:
        raise UnsupportedError(f"the Ray Serve deployment needs Ray: pip install 'ray[serve]' ({e})") from None
    from . import create_app

    served_name = name or model

    def load():
        from ..model import Model
        return Model.load(model, device=device, context_length=context_length, slots=slots)

    app = create_app(load, name=served_name, api_key=api_key, max_queue=max_queue)
    options = dict(max_ongoing_requests=max_ongoing_requests, ray_actor_options=ray_actor_options or {})
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = num_replicas

    @serve.deployment(name="wasmchord", **options)
    @serve.ingress(app)
    class Replica:
        def __init__(self):
            app.state.served.start()  # the model loads on a thread; /health is 503 until it is ready

    return Replica.bind()
