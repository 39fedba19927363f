"""Common English words: the tiny model's vocabulary core and the text that chat prompts are made of."""

WORDS = """the of and to in is was for on that with as by at from it his an were are which this be
or has had not but first one their its new after who they have her she two been other when there
all during into school time may years more most only over city some world would where later up such
used many can state about national out known university united then made also under well between
while team year part could three season people both through like city four second because family
series number work these life being called them since year against film before album group between
music game water light house river place north south east west small large great long high old early
government system history book line area point number name public power form world company member
country church party road town center century war end art field station show land day night general
body order service club case side record home death head race level story market child cause event
play street lake range sea island band design rule report role model village court data thought mind
language village letter board energy space study theory voice value money table paper view word
report plan garden color summer winter spring autumn morning evening river mountain forest ocean
""".split()
WORDS = list(dict.fromkeys(WORDS))  # de-duplicated, order kept
