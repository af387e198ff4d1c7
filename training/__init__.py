"""convserve training: recipes, dataset loaders, training, evaluation and export to models/."""
