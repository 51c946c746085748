"""The interactive simulator: choice model, environment API and errors, policies, harness, CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recforge.core.slates import EpsilonGreedy
from recforge.data import Interactions
from recforge.data.impressions import check_impressions
from recforge.errors import DataError, UnknownNameError, UnsupportedError
from recforge.interactive import (
    ExploringPolicy,
    FrozenPolicy,
    ImpressionRecorder,
    Policy,
    SlateEnvironment,
    TruePreferences,
    UserBehaviour,
    create_policy,
    make_environments,
    parse_explore,
    play_episode,
    save_results,
    simulate,
)

BEHAVIOUR = UserBehaviour(no_click=3.0)  # the planted catalogue is small: a lower outside option


@pytest.fixture(scope="module")
def envs(planted: Interactions):
    return make_environments(planted, min_events=10, behaviour=BEHAVIOUR, seed=0)


def test_true_preferences_are_standardised_in_closed_form() -> None:
    rng = np.random.default_rng(0)
    truth = TruePreferences(rng.normal(size=(7, 4)), rng.normal(size=(300, 4)) + 0.5)
    z = truth.z_all(np.arange(7))
    np.testing.assert_allclose(z.mean(axis=1), 0.0, atol=1e-9)
    np.testing.assert_allclose(z.std(axis=1), 1.0, rtol=1e-9)
    slates = np.array([[3, 9, 27]] * 7)
    np.testing.assert_allclose(truth.z(np.arange(7), slates), z[:, [3, 9, 27]])
    # popularity 0 removes the average user direction: the mean user then scores every item alike
    flat = TruePreferences(np.ones((2, 4)), rng.normal(size=(50, 4)), popularity=0.0)
    assert np.allclose(flat.user_factors, 0.0)
    with pytest.raises(DataError, match="popularity"):
        TruePreferences(np.ones((2, 2)), np.ones((3, 2)), popularity=2.0)


def test_intent_uses_a_few_feature_dimensions() -> None:
    rng = np.random.default_rng(1)
    genres = np.zeros((40, 6))
    genres[np.arange(40), np.arange(40) % 6] = 1.0
    truth = TruePreferences(rng.normal(size=(5, 3)), rng.normal(size=(40, 3)), intent=1.0, seed=2,
                            intent_features=genres, intent_topics=2)
    assert ((truth.intent_vectors > 0).sum(axis=1) == 2).all()
    np.testing.assert_allclose(truth.intent_vectors.sum(axis=1), 1.0)
    z = truth.z_all(np.arange(5))
    liked = np.argmax(truth.intent_vectors[0])
    assert z[0, genres[:, liked] == 1].mean() > z[0, genres[:, liked] == 0].mean()


def test_click_probabilities_follow_the_logit(envs) -> None:
    env = SlateEnvironment(envs.truth, envs.test.users[:3], envs.visible, BEHAVIOUR, seed=5)
    user = int(env.users[0])
    fresh = np.setdiff1d(np.arange(env.n_items), envs.visible.csr("ones")[user].indices)[:5]
    prob = env.click_probabilities([user], [fresh])[0]
    z = envs.truth.z(np.array([user]), fresh[None, :])[0]
    util = BEHAVIOUR.beta * z - BEHAVIOUR.position_decay * np.log1p(np.arange(5))
    expected = np.exp(np.concatenate([[BEHAVIOUR.no_click], util]))
    np.testing.assert_allclose(prob, expected / expected.sum(), rtol=1e-9)
    # after the slate was shown once, each of its items loses shown_penalty utility
    env.get_state()
    while env.get_state() != user:
        env.get_response(np.arange(5) + 5 * env._cursor)
    env.get_response(fresh)
    again = env.click_probabilities([user], [fresh])[0]
    shifted = np.exp(np.concatenate([[BEHAVIOUR.no_click], util - BEHAVIOUR.shown_penalty - BEHAVIOUR.consumed_penalty
                                     * np.isin(fresh, env.clicked_history(user))]))
    np.testing.assert_allclose(again, shifted / shifted.sum(), rtol=1e-9)


def test_bad_slates_get_clear_errors(envs) -> None:
    env = envs.test
    env.reset()
    for bad, message in (([1, 2, 3], "exactly 5"), ([1, 1, 2, 3, 4], "repeat"), ([1, 2, 3, 4, 10**6], "unknown item"),
                         ([1.5, 2, 3, 4, 5], "integer")):
        with pytest.raises(DataError, match=message):
            env.get_response(bad)
    with pytest.raises(DataError, match="one slate per pending user"):
        env.get_responses(np.zeros((1, 5), np.int64))
    with pytest.raises(DataError, match="positive integer"):
        UserBehaviour(patience=0).check()


def test_episode_api_is_repeatable_and_users_leave(envs) -> None:
    def run(env: SlateEnvironment) -> tuple[list, int]:
        log = []
        while env.has_next_state():
            user = env.get_state()
            slate = (np.arange(5) + 7 * user) % env.n_items
            clicked, stays = env.get_response(slate)
            log.append((user, clicked, stays))
        return log, env.total_steps

    env = SlateEnvironment(envs.truth, envs.test.users[:20], envs.visible, BEHAVIOUR, seed=11)
    first, steps = run(env)
    again = SlateEnvironment(envs.truth, envs.test.users[:20], envs.visible, BEHAVIOUR, seed=11)
    assert run(again) == (first, steps)
    assert steps <= 20 * BEHAVIOUR.horizon and not env.has_next_state()
    # the same slate shown over and over bores everyone: nobody stays to the horizon
    assert (env.steps < BEHAVIOUR.horizon).all()
    env.reset()
    assert env.episode == 1 and env.total_steps == 0 and env.has_next_state()


def test_patience_ends_sessions_without_clicks(envs) -> None:
    never = UserBehaviour(no_click=50.0, patience=4)
    env = SlateEnvironment(envs.truth, envs.test.users[:30], envs.visible, never, seed=0)
    result = play_episode(create_policy("random").fit(envs.visible), env)
    assert result.clicks == 0 and (env.steps == 4).all() and result.steps == 120
    assert (env.get_score() == 0).all()


def test_policies_rank_as_expected_and_learning_pays(envs) -> None:
    ctr = {}
    for label, name, params in (("random", "random", {}), ("static", "greedy", {"learn": False}),
                                ("linucb", "linucb", {}), ("oracle", "oracle", {"truth": envs.truth})):
        ctr[label] = simulate(create_policy(name, **params), envs, train_episodes=1, test_episodes=3,
                              progress=False).summary()["test ctr"]
    assert ctr["random"] + 0.05 < ctr["static"] < ctr["linucb"] < ctr["oracle"]


def test_every_policy_serves_valid_slates(envs) -> None:
    users = envs.test.users[:25]
    for name, params in (("pop", {}), ("greedy", {}), ("egreedy", {"epsilon": 0.5}), ("hybrid", {}),
                         ("thompson", {}), ("sequential", {"model": "pooling", "params": {"epochs": 2, "num_threads": 1}})):
        policy = create_policy(name, **params).fit(envs.visible)
        slates = policy.act(users)
        assert slates.shape == (25, 5)
        assert (np.sort(slates, axis=1)[:, 1:] != np.sort(slates, axis=1)[:, :-1]).all()
        seen = envs.visible.csr("ones")
        for u, slate in zip(users, slates):
            assert not np.isin(slate, seen[u].indices).any()  # never an item of the visible history
        policy.update(users, slates, slates[:, 0])
        nxt = policy.act(users)
        assert not any(np.isin(a, b).any() for a, b in zip(nxt, slates))  # nor one shown this episode
    with pytest.raises(UnknownNameError, match="available policies"):
        create_policy("ucb1")
    with pytest.raises(DataError, match="no parameter"):
        create_policy("linucb", beta=3)


def test_snapshot_restore_brings_back_the_starting_weights(envs) -> None:
    policy = create_policy("linucb").fit(envs.visible)
    start = policy.snapshot()
    play_episode(policy, envs.train)
    assert not np.allclose(policy.cov_, start["cov_"])
    policy.restore(start)
    np.testing.assert_array_equal(policy.cov_, start["cov_"])
    np.testing.assert_array_equal(policy.b_, start["b_"])


def test_a_frozen_policy_acts_as_trained_and_learns_nothing_more(envs) -> None:
    """LinUCB trained one episode, frozen: the same slates as the trained policy, unchanged by an episode of
    feedback (its posterior stays), while it still never repeats an item within the episode."""
    trained = create_policy("linucb").fit(envs.visible)
    play_episode(trained, envs.train)
    users = envs.test.users[:30]
    trained.start_episode()
    expected = trained.act(users)
    frozen = FrozenPolicy(trained).fit(envs.visible)
    assert frozen.policy is trained and not frozen.learns and frozen.name == "linucb-frozen"
    cov = trained.cov_.copy()
    first = frozen.act(users)
    np.testing.assert_array_equal(first, expected)
    play_episode(frozen, envs.test)
    np.testing.assert_array_equal(trained.cov_, cov)
    frozen.start_episode()
    np.testing.assert_array_equal(frozen.act(users), first)
    frozen.update(users, first, np.full(len(users), -1))
    assert not (frozen.act(users)[:, :, None] == first[:, None, :]).any()  # shown items are not shown again
    with pytest.raises(UnsupportedError, match="not deterministic"):
        FrozenPolicy(create_policy("thompson"))


def test_harness_writes_notebook_style_outputs(envs, tmp_path) -> None:
    results = [simulate(create_policy(name), envs, train_episodes=2, test_episodes=2, progress=False)
               for name in ("random", "greedy")]
    scores = results[1].user_scores()
    assert list(scores.columns) == ["user_id", "avg_score"] and len(scores) == len(envs.test.users)
    assert scores["avg_score"].between(0, 1).all()
    summary = results[1].summary()
    assert {"test ctr", "test ctr ±", "avg score", "avg score ±", "steps/s"} <= set(summary)
    paths = save_results(results, tmp_path / "sim")
    table = pd.read_csv(paths["csv"])
    assert table["policy"].tolist() == ["greedy", "random"]
    assert pd.read_csv(tmp_path / "sim" / "scores_greedy.csv").shape == (len(envs.test.users), 2)
    assert (tmp_path / "sim" / "ctr_curve.png").stat().st_size > 1000
    assert (tmp_path / "sim" / "results.md").read_text().startswith("| policy |")


def test_environments_split_users_and_hide_later_events(planted: Interactions, envs) -> None:
    assert not set(envs.train.users) & set(envs.test.users)
    counts = planted.user_counts()
    visible = envs.visible.user_counts()
    for u in envs.test.users[:20]:
        assert visible[u] == np.ceil(0.5 * counts[u])
    with pytest.raises(DataError, match="visible_fraction"):
        make_environments(planted, visible_fraction=0.0)


# ---------------------------------------------------------------------------------------------------- logging
def test_exploring_policy_logs_slates_with_their_probabilities(envs) -> None:
    """Every logged slate carries the probabilities the exploring policy gives it (asked again, in the same state),
    the wrapped greedy policy gives the logged slates probability 1 exactly where they are its own, and the log
    is a valid impression table whose clicks are the episode's."""
    policy = ExploringPolicy(create_policy("greedy", learn=False), EpsilonGreedy(5, 0.5)).fit(envs.visible)
    users = envs.test.users[:40]
    draw = policy.act_draw(users)
    again = policy.slate_probabilities(users, draw.slates)
    np.testing.assert_allclose(again.prefix, draw.prefix)
    np.testing.assert_allclose(again.position, draw.position)
    greedy = policy.policy.act(users)
    own = policy.policy.slate_probabilities(users, draw.slates)
    np.testing.assert_array_equal(own.slate, (draw.slates == greedy).all(axis=1).astype(float))
    explored = ~(draw.slates == greedy).all(axis=1)
    assert 5 < explored.sum() < 35 and (draw.slate[~explored] > 0.5).all() and (draw.slate[explored] < 1e-6).all()
    seen = envs.visible.csr("ones")
    assert not any(np.isin(s, seen[u].indices).any() for u, s in zip(users, draw.slates))
    recorder = ImpressionRecorder(envs.visible.user_map, envs.visible.item_map, "v1")
    result = play_episode(policy, envs.test, recorder=recorder, label="logger")
    log = check_impressions(recorder.frame())
    assert len(log) == result.steps == len(recorder) and set(log["policy"]) == {"logger"}
    assert int(np.stack(log["reward"].to_numpy()).sum()) == result.clicks
    assert log["slate_propensity"].between(0, 1, inclusive="right").all()


def test_only_policies_with_known_probabilities_are_logged(envs) -> None:
    for name in ("hybrid", "egreedy", "random"):
        with pytest.raises(UnsupportedError, match="deterministic"):
            ExploringPolicy(create_policy(name), EpsilonGreedy(5, 0.2))
    with pytest.raises(UnsupportedError, match="does not know"):
        play_episode(create_policy("thompson").fit(envs.visible), envs.test,
                     recorder=ImpressionRecorder(envs.visible.user_map, envs.visible.item_map))
    random = create_policy("random").fit(envs.visible)  # uniformly random slates: probabilities known
    draw = random.act_draw(envs.test.users[:3])
    n_allowed = envs.visible.n_items - np.diff(envs.visible.csr("ones")[envs.test.users[:3]].indptr)
    np.testing.assert_allclose(draw.position, np.repeat(1 / n_allowed[:, None], 5, axis=1))
    for spec in ("sometimes", "epsilon:x", "swap"):
        with pytest.raises(DataError, match="exploration"):
            parse_explore(spec, 5)


@pytest.mark.parametrize("name", ["pop", "greedy-static", "oracle"])
def test_static_policies_rank_once_and_show_the_same_slates(envs, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A static policy picks from each user's ranked candidates; its slates equal ranking the whole catalogue at
    every step, also once a long session has used the candidates up (few kept here)."""
    monkeypatch.setattr(Policy, "_CANDIDATES", 12)
    params = {"learn": False} if name == "greedy-static" else {"truth": envs.truth} if name == "oracle" else {}
    policy = create_policy("greedy" if name == "greedy-static" else name, **params).fit(envs.visible)
    assert policy.static_scores
    env = envs.test
    env.reset()
    policy.start_episode()
    rounds = 0
    while env.has_next_state():
        users = env.get_states()
        slates = policy.act(users)
        np.testing.assert_array_equal(slates, policy._top(users, np.ascontiguousarray(policy.scores(users), np.float32)))
        clicked, _ = env.get_responses(slates)
        policy.update(users, slates, clicked)
        rounds += 1
    assert rounds > 3 and len(policy.candidates_) == len(env.users)
