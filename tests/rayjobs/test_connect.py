import os


def test_a_local_rays_workers_inherit_the_drivers_environment_and_have_no_runtime_env(local_ray):
    """The workers of the local Ray that `cluster.connect` starts build and find models where
    the driver does because they inherit its environment (the model cache, the offline flag,
    Ray Data's autoscaler), with no runtime env: with one, Ray starts each worker through its
    setup script, a second Python start per worker (BENCHMARKS.md, "Where a pipeline run's
    CPU seconds go")."""
    names = ("BLIPINPAINT_CACHE", "HF_HUB_OFFLINE", "RAY_DATA_CLUSTER_AUTOSCALER")

    @local_ray.remote(num_cpus=0)
    def seen():
        import ray

        return {k: os.environ.get(k) for k in names}, dict(ray.get_runtime_context().runtime_env)

    env, runtime_env = local_ray.get(seen.remote())
    assert env == {k: os.environ[k] for k in names}
    assert runtime_env == {}
