"""Generated documentation blocks."""

import pytest

from adamerge.reporting.results import replace_marked_block


def test_generated_readme_blocks_replace_only_their_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- t:start -->\nold\n<!-- t:end -->\nrest\n")
    replace_marked_block(readme, "t", "| new |")
    assert readme.read_text() == "intro\n<!-- t:start -->\n| new |\n<!-- t:end -->\nrest\n"
    with pytest.raises(ValueError, match="no <!-- other:start -->"):
        replace_marked_block(readme, "other", "x")
