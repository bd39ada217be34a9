"""The payment kinds the gateway accepts: one module each (prepaid, channel, exact), one
shape (base.Scheme, with an optional hold step: base.HoldingScheme) and one registry
(registry.Schemes) that the check (server/authz) and the response phase
(server/processing/) pick from by the payment's scheme name."""
