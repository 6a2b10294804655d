"""Training strategies beyond plain weighted training. Each supplies losses, phases and data to the one
training loop (`ease.training.loop.fit`); none has a loop of its own.

    token_routed  seed 000: each token trains only the route it takes (a Trainer with another batch loss)
    ashem         seed 002: Block 1 on all tokens, Block 2 on the hard ones, routing at the top of Block 1

The standard strategy is `ease.training.Trainer` itself. The Hydra app's edge for all three is
`ease.app.train_task`.
"""

STRATEGIES = ("standard", "ashem", "token_routed")
