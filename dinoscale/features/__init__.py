"""Feature extraction and the content-addressed feature store."""

from dinoscale.features.store import EXTRACTOR_VERSION, FeatureKey, FeatureSet, FeatureStore, FeatureStoreError  # noqa: F401
