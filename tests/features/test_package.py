import subprocess
import sys

import tlpipe.features as features


def test_every_public_name_resolves_from_its_module():
    for name in [*features.__all__, "EmbeddingTransformer"]:
        value = getattr(features, name)
        assert value.__module__.startswith("tlpipe.features."), name
    assert set(features.__all__) <= set(dir(features))
    # one name, one meaning: features.extract is the submodule, the function is the facade's
    import tlpipe
    import tlpipe.features.extract

    assert features.extract is tlpipe.features.extract and tlpipe.extract is features.extract.extract


def test_heads_and_compare_do_not_import_the_stage():
    # compare's joblib workers import the heads, which read the cache: the decoder, the stage and extraction
    # are imported only when used (each costs start-up time in every worker process)
    code = (
        "import sys, tlpipe.pipeline.heads.selection, tlpipe.pipeline.heads.estimators; "
        "print(sorted(m for m in sys.modules if m.startswith('tlpipe.features.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))
    assert "tlpipe.features.cache" in loaded
    assert not loaded & {
        "tlpipe.features.decoder",
        "tlpipe.features.extract",
        "tlpipe.features.stream",
        "tlpipe.features.images",
    }, loaded
