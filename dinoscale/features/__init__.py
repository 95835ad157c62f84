"""Feature extraction, its recipe and the content-addressed feature store."""

from dinoscale.features.recipe import FeatureRecipe  # noqa: F401
from dinoscale.features.store import EXTRACTOR_VERSION, FeatureKey, FeatureSet, FeatureStore, FeatureStoreError  # noqa: F401
