"""Settings: flags over environment over defaults, and errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from encoder_service.settings import ENV_PREFIX, EncoderSettings
from vpm_common.settings import SettingsError, check, load_settings, setting


@dataclass(frozen=True)
class Example:
    port: int = setting(50051, "port")
    targets: tuple[str, ...] = setting(("a:1",), "targets")
    verbose: bool = setting(False, "verbose")
    url: str = setting("sqlite://", "url", env="EXAMPLE_URL")
    ratio: float = setting(0.5, "ratio")
    path: Path = setting(Path("data"), "path")

    def __post_init__(self) -> None:
        check(self.ratio <= 1, "ratio", f"must be at most 1, got {self.ratio}")


def test_defaults_environment_and_flags_in_that_order() -> None:
    assert load_settings(Example, "X_", [], {}) == Example()
    env = {
        "X_PORT": "7",
        "X_TARGETS": "b:2, c:3",
        "X_VERBOSE": "yes",
        "EXAMPLE_URL": "postgresql://h/db",
    }
    settings = load_settings(Example, "X_", [], env)
    assert (settings.port, settings.targets, settings.verbose, settings.url) == (
        7,
        ("b:2", "c:3"),
        True,
        "postgresql://h/db",
    )
    settings = load_settings(Example, "X_", ["--port", "9", "--path", "/tmp/x"], env)
    assert (settings.port, settings.path) == (9, Path("/tmp/x"))
    assert load_settings(Example, "X_", ["--verbose"], {}).verbose is True
    assert load_settings(Example, "X_", ["--verbose", "false"], env).verbose is False


def test_a_bad_environment_value_names_the_variable_unless_its_flag_wins() -> None:
    with pytest.raises(SettingsError, match=r"X_PORT='abc': expected an integer"):
        load_settings(Example, "X_", [], {"X_PORT": "abc"})
    assert load_settings(Example, "X_", ["--port", "7"], {"X_PORT": "abc"}).port == 7


def test_validation_errors_name_the_flag_and_the_variable() -> None:
    with pytest.raises(SettingsError, match=r"--ratio / X_RATIO: must be at most 1, got 2.0"):
        load_settings(Example, "X_", ["--ratio", "2"], {})


def test_a_bad_flag_exits_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        load_settings(Example, "X_", ["--port", "many"], {})
    assert caught.value.code == 2
    assert "--port: expected an integer, got 'many'" in capsys.readouterr().err


def test_encoder_flags_match_the_contract() -> None:
    settings = load_settings(EncoderSettings, ENV_PREFIX, [], {})
    assert (settings.port, settings.model, settings.pretrained) == (
        50051,
        "ViT-B-32",
        "laion2b_s34b_b79k",
    )
    env = {
        "VPM_ENCODER_MAX_BATCH": "32",
        "VPM_ENCODER_RUNTIME": "onnx",
        "VPM_ENCODER_DEVICE": "cpu",
    }
    settings = load_settings(
        EncoderSettings, ENV_PREFIX, ["--max-delay-ms", "2", "--workers", "3"], env
    )
    assert (settings.max_batch, settings.runtime, settings.device) == (32, "onnx", "cpu")
    assert (settings.max_delay_ms, settings.workers) == (2.0, 3)
    with pytest.raises(
        SettingsError, match="VPM_ENCODER_RUNTIME: expected one of auto, torch, onnx"
    ):
        load_settings(EncoderSettings, ENV_PREFIX, [], {"VPM_ENCODER_RUNTIME": "tensorrt"})


def test_an_encoder_pixel_limit_pillow_would_not_honour_is_refused() -> None:
    """Pillow refuses images over twice its MAX_IMAGE_PIXELS as bombs, whatever ours says."""
    from PIL import Image

    beyond = 2 * Image.MAX_IMAGE_PIXELS + 1
    with pytest.raises(SettingsError, match=r"--max-image-pixels .*: must be 1 to \d+ \(Pillow"):
        load_settings(EncoderSettings, ENV_PREFIX, ["--max-image-pixels", str(beyond)], {})
    settings = load_settings(
        EncoderSettings, ENV_PREFIX, ["--max-image-pixels", str(beyond - 1)], {}
    )
    assert settings.max_image_pixels == beyond - 1
