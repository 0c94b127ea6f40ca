"""Wire types of the Runware protocol, model request rules and the error tree."""
