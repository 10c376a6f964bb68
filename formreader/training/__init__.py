"""The models' making: the CNNs, their training on several populations of writers, the data
sets, synthetic forms and checks made from real digits, and the held-out evaluation."""
