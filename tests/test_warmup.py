"""Warm-up in steps: the default ratio rounds up (a short run loses its first step to learning rate 0),
train.warmup_steps says exactly how many steps warm up."""

from shifu.train import training_args


def test_a_ratio_rounds_up_to_a_whole_step(make_config):
    args = training_args(make_config(train__warmup_ratio=0.03), has_eval=False)
    assert args.get_warmup_steps(12) == 1


def test_warmup_steps_override_the_ratio(make_config):
    assert training_args(make_config(train__warmup_steps=0), has_eval=False).get_warmup_steps(12) == 0
    assert training_args(make_config(train__warmup_steps=3), has_eval=False).get_warmup_steps(12) == 3
