"""The registry of checkpoint layouts, keyed by the exact architecture names of their `config.json`."""

from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import register_checkpoint_conversion_mapping

from align.errors import BackboneError
from align.named import Registry


@dataclass(frozen=True)
class NativeLayout:
    """One official checkpoint layout and the native class it loads into."""

    name: str
    architectures: tuple[str, ...]  # `architectures` entries of the official config.json
    fits: Callable[[dict], bool]  # among layouts sharing an architecture name, whether this one reads the config
    config: Callable[[dict], dict]  # official config.json → keyword arguments of the native config
    loading_class: type[PreTrainedModel]  # reads the official tensor names (its model type carries the mapping)
    native_class: type[PreTrainedModel]  # what a converted directory holds (`align convert-backbone`)
    weight_mapping: Callable[[], list] | None = None  # transformers WeightRenaming / WeightConverter list
    norm_head: Callable[[dict], bool] = field(default=lambda config: False)  # output rows are L2-normalised in use

    def arguments(self, config: dict) -> dict:
        """The native config's keyword arguments, or a one-line error naming the size config.json lacks."""
        try:
            return self.config(config)
        except KeyError as exc:
            raise BackboneError(f"config.json of this {self.name} checkpoint has no {exc}") from None

    def loading_config(self, config: dict) -> PretrainedConfig:
        """The config the loading class is built from."""
        return self.loading_class.config_class(**self.arguments(config))

    def native_config(self, config: dict) -> PretrainedConfig:
        """The config a converted directory holds, naming the native class."""
        native = self.native_class.config_class(**self.arguments(config))
        native.architectures = [self.native_class.__name__]
        return native


_LAYOUTS: Registry[NativeLayout] = Registry("checkpoint layout")


def register_layout(layout: NativeLayout) -> NativeLayout:
    """Add a layout; a duplicate name is an error. Its weight mapping is registered for its model type alone."""
    _LAYOUTS.register(layout.name, layout)
    if layout.weight_mapping is not None:
        register_checkpoint_conversion_mapping(layout.loading_class.config_class.model_type, layout.weight_mapping())
    return layout


def native_architectures() -> set[str]:
    """Every architecture name some layout loads natively."""
    return {arch for layout in _LAYOUTS.values() for arch in layout.architectures}


def layout_for(config: dict) -> NativeLayout | None:
    """The layout that reads this config.json, or None when transformers loads it as it is."""
    names = config.get("architectures") or []
    found = [layout for layout in _LAYOUTS.values() if set(names) & set(layout.architectures) and layout.fits(config)]
    if len(found) > 1:
        raise BackboneError(f"architectures {names} fit several layouts: {', '.join(l.name for l in found)}")
    return found[0] if found else None


def first_of(config: dict, *names: str, default=None):
    """The value of the first key present (official releases name the same size differently)."""
    for name in names:
        if config.get(name) is not None:
            return config[name]
    if default is not None:
        return default
    raise BackboneError(f"config.json has none of {', '.join(names)}")
