"""trl_opsd.objective: the Divergence description (what a teacher must provide, the refusals) and token_terms."""

import pytest
import torch

from trl_opsd import OPSDConfig
from trl_opsd.forward import HeadInputs
from trl_opsd.losses import clip_per_token, per_token_divergence
from trl_opsd.objective import Divergence, TeacherRequirement, token_terms, window_token_mean
from trl_opsd.teachers.base import Teacher, TeacherCapabilityError


def _config(tmp_path, **knobs):
    return OPSDConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **knobs)


def _remote(*capabilities, max_top_k=None):
    teacher = Teacher("api", max_top_k=max_top_k)
    teacher.capabilities = frozenset(capabilities)
    return teacher


def test_from_config_reads_the_loss_knobs_once(tmp_path):
    divergence = Divergence.from_config(_config(tmp_path, divergence="topk", teacher_top_k=7, beta=0.5,
                                                loss_temperature=2.0, kl_clip=0.3, kl_clip_mode="scale"))
    assert divergence == Divergence(kind="topk", beta=0.5, temperature=2.0, top_k=7, clip=0.3, clip_mode="scale",
                                    ratio_cap=2.0)
    assert Divergence.from_config(_config(tmp_path, divergence="sampled")).top_k == 0


@pytest.mark.parametrize("kind, requirement", [("full", TeacherRequirement("dense", None)),
                                               ("topk", TeacherRequirement("topk", 20)),
                                               ("sampled", TeacherRequirement("sampled", None))])
def test_teacher_requirement(tmp_path, kind, requirement):
    divergence = Divergence.from_config(_config(tmp_path, divergence=kind))
    assert divergence.teacher_requirement() == requirement
    assert requirement.remote_ok == (kind != "full")
    assert set(divergence.describe()) == {"divergence", "clip", "loss_temperature"}


def test_check_teacher_refuses_what_a_remote_teacher_cannot_give():
    with pytest.raises(ValueError, match="divergence='full' needs the teacher's dense logits"):
        Divergence("full").check_teacher(_remote("topk", "sampled"))
    with pytest.raises(TeacherCapabilityError, match="cannot provide 'topk'"):
        Divergence("topk", top_k=5).check_teacher(_remote("sampled"))
    with pytest.raises(TeacherCapabilityError, match="exceeds the provider cap of 4"):
        Divergence("topk", top_k=5).check_teacher(_remote("topk", max_top_k=4))
    with pytest.raises(ValueError, match="set loss_temperature=1.0"):
        Divergence("sampled", temperature=2.0).check_teacher(_remote("sampled"))
    Divergence("sampled").check_teacher(_remote("sampled"))  # no error


def test_dense_and_chunked_terms_agree_and_match_the_losses():
    torch.manual_seed(0)
    hidden_s, hidden_t = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8)
    weight_s, weight_t = torch.randn(11, 8), torch.randn(11, 8)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    completions = torch.randint(0, 11, (2, 5))
    divergence = Divergence("full", beta=0.5, clip=0.5, clip_mode="clamp")
    dense = token_terms(divergence, hidden_s @ weight_s.T, hidden_t @ weight_t.T, completions, mask)
    chunked = token_terms(divergence, HeadInputs(hidden_s, weight_s, None), HeadInputs(hidden_t, weight_t, None),
                          completions, mask, chunk_size=3)
    reference = per_token_divergence(hidden_s @ weight_s.T, hidden_t @ weight_t.T, 0.5)
    torch.testing.assert_close(dense.divergence, reference)
    torch.testing.assert_close(dense.per_token_loss, clip_per_token(reference, 0.5, "clamp"))
    for name in ("per_token_loss", "divergence", "student_entropy", "teacher_entropy"):
        torch.testing.assert_close(getattr(chunked, name)[mask], getattr(dense, name)[mask], msg=name)
    assert (dense.student_entropy[~mask] == 0).all()


def test_window_token_mean_scales_by_the_ranks_only_for_a_window_count():
    values, mask = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[True, True, False]])
    assert window_token_mean(values, mask, None, num_processes=4).item() == pytest.approx(1.5)
    assert window_token_mean(values, mask, torch.tensor(6), num_processes=4).item() == pytest.approx(2.0)
