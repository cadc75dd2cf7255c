"""The BUARL method: uncertainty, region weight maps, losses, copy-paste, EMA teacher."""
